"""Batched LoRA: stacked slot tensors applied per row inside the base model's Linears."""
