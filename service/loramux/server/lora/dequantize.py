"""A base layer's weight as full-precision values, whatever quantization holds it (the slot
layers wrap quantized layers; DoRA's norms and merges need the full values)."""

from __future__ import annotations

import torch


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A base weight as full-precision values, whatever holds it: torchao's int8 tensors,
    bitsandbytes' 8-bit (a scale per row) and 4-bit (blocks) parameters, or a plain tensor."""
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes 4-bit
        import bitsandbytes.functional as bnb

        return bnb.dequantize_4bit(weight.data, weight.quant_state).float()
    if getattr(weight, "SCB", None) is not None and weight.dtype == torch.int8:  # bitsandbytes 8-bit
        return weight.data.float() * weight.SCB.float().view(-1, 1) / 127
    if hasattr(weight, "dequantize"):  # torchao
        return weight.dequantize().float()
    return weight
