"""A Linear that adds a per-row LoRA delta from stacked adapter slots.

For row i of a batch, routed to slot s = slot_index[i]:

    y_i = base(x_i) + scale[s] * (x_i @ A[s]^T) @ B[s]^T

The adapters' weights live in preallocated tensors with one extra, permanently zero slot
(index `num_slots`) for rows served by the base model alone: such a row gets
base(x) + 0.0, which is exactly base(x). Ranks below the slot rank are zero-padded, and a
slot is zeroed entirely before it is refilled, so no reused slot keeps old weights.
"""

from __future__ import annotations

import torch
from torch import nn


class LoraRouting:
    """Which slot each row of the current batch uses; shared by all slot layers of a model.

    Set by the engine before each forward pass. None means "no row has an adapter", and the
    layers then skip the LoRA arithmetic entirely.
    """

    def __init__(self) -> None:
        self.slot_index: torch.Tensor | None = None  # [batch] int64 on the model's device

    def set(self, slot_index: torch.Tensor | None, base_slot: int) -> None:
        if slot_index is not None and bool((slot_index == base_slot).all()):
            slot_index = None
        self.slot_index = slot_index


class SlotLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, num_slots: int, max_rank: int, routing: LoraRouting):
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.num_slots = num_slots
        self.max_rank = max_rank
        w = base_layer.weight
        out_features, in_features = w.shape
        # Not persistent: the slots are serving state, never part of a checkpoint.
        self.register_buffer(
            "lora_A", torch.zeros(num_slots + 1, max_rank, in_features, dtype=w.dtype, device=w.device), persistent=False
        )  # [S+1, R, in]
        self.register_buffer(
            "lora_B", torch.zeros(num_slots + 1, out_features, max_rank, dtype=w.dtype, device=w.device), persistent=False
        )  # [S+1, out, R]
        self.register_buffer("scale", torch.zeros(num_slots + 1, dtype=w.dtype, device=w.device), persistent=False)  # [S+1]

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[2]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, seq, in]
        result = self.base_layer(x)
        idx = self.routing.slot_index
        if idx is None:
            return result
        a = self.lora_A.index_select(0, idx)  # [batch, R, in]
        b = self.lora_B.index_select(0, idx)  # [batch, out, R]
        s = self.scale.index_select(0, idx).view(-1, 1, 1)  # [batch, 1, 1]
        x = x.to(a.dtype)
        delta = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2)) * s  # [batch, seq, out]
        return result + delta.to(result.dtype)

    @torch.no_grad()
    def fill(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Copy one adapter's A [r, in] and B [out, r] into `slot`, zero-padding to max_rank."""
        r = a.shape[0]
        self.clear(slot)
        self.lora_A[slot, :r].copy_(a, non_blocking=True)
        self.lora_B[slot, :, :r].copy_(b, non_blocking=True)
        self.scale[slot] = scale

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scale[slot] = 0.0

    def read(self, slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's unpadded A [r, in] and B [out, r], as host copies."""
        return self.lora_A[slot, :rank].to("cpu", copy=True), self.lora_B[slot, :, :rank].to("cpu", copy=True)
