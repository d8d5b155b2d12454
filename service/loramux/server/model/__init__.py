"""The served base model: loading, dtype and device, quantization, slot layers wrapped in."""
