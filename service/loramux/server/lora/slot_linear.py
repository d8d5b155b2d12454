"""A Linear that adds a per-row LoRA delta from stacked adapter slots.

For row i of a batch, routed to slot s = slot_index[i]:

    y_i = base(x_i) + scale[s] * (x_i @ A[s]^T) @ B[s]^T

The slots store A^T and B^T (`lora_A_t [S+1, in, R]`, `lora_B_t [S+1, R, out]`), so the
rows gathered from them are already laid out for `bmm`.

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

    Gathering each row's A and B out of the slot tensors into fresh memory at every step
    costs far more than the LoRA arithmetic itself on CPU (page faults on a new rows x rank x
    (in + out) copy per layer). So a layer gathers into storage it keeps, and reuses the
    gathered weights while the routing tensor stays the same object (the engine keeps one
    per batch composition) and no slot was refilled. Both hold for batches of at most
    `cache_rows` rows (a memory bound); larger ones gather fresh copies every pass.
    """

    def __init__(self) -> None:
        self.slot_index: torch.Tensor | None = None  # [batch] int64 on the model's device
        self.generation = 0  # bumped whenever a slot's weights change
        self.cache_rows = 0  # batches up to this many rows keep their gathered weights


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
            "lora_A_t", torch.zeros(num_slots + 1, in_features, max_rank, dtype=w.dtype, device=w.device), persistent=False
        )  # [S+1, in, R]: A^T
        self.register_buffer(
            "lora_B_t", torch.zeros(num_slots + 1, max_rank, out_features, dtype=w.dtype, device=w.device), persistent=False
        )  # [S+1, R, out]: B^T
        self.register_buffer("scale", torch.zeros(num_slots + 1, dtype=w.dtype, device=w.device), persistent=False)  # [S+1]
        # (routing tensor, slot generation) -> per-row A^T [batch, in, R], B^T [batch, R, out], scale [batch, 1, 1]
        self._gathered: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # Reused storage for the gathered rows: a fresh large allocation per pass costs more
        # (page faults) than the gather itself on CPU.
        self._buffer_a: torch.Tensor | None = None
        self._buffer_b: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.lora_A_t.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B_t.shape[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, seq, in]
        result = self.base_layer(x)
        idx = self.routing.slot_index
        if idx is None:
            return result
        a_t, b_t, s = self._per_row(idx)
        delta = torch.bmm(torch.bmm(x.to(a_t.dtype), a_t), b_t) * s  # [batch, seq, out]
        return result + delta.to(result.dtype)

    def _per_row(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's A^T [batch, in, R], B^T [batch, R, out] and scale [batch, 1, 1]."""
        routing = self.routing
        cached = self._gathered
        if cached is not None and cached[0] is idx and cached[1] == routing.generation:
            return cached[2], cached[3], cached[4]
        rows = idx.shape[0]
        s = self.scale.index_select(0, idx).view(-1, 1, 1)
        if rows > routing.cache_rows:  # over the memory bound: fresh copies, dropped after the pass
            self._gathered = None
            return self.lora_A_t.index_select(0, idx), self.lora_B_t.index_select(0, idx), s
        if self._buffer_a is None or self._buffer_a.shape[0] < rows:
            # Room for the next power of two of rows (within the bound), reused from then on.
            capacity = min(routing.cache_rows, 1 << (rows - 1).bit_length())
            self._buffer_a = self.lora_A_t.new_empty((capacity, *self.lora_A_t.shape[1:]))
            self._buffer_b = self.lora_B_t.new_empty((capacity, *self.lora_B_t.shape[1:]))
        a_t = torch.index_select(self.lora_A_t, 0, idx, out=self._buffer_a[:rows])
        b_t = torch.index_select(self.lora_B_t, 0, idx, out=self._buffer_b[:rows])
        self._gathered = (idx, routing.generation, a_t, b_t, s)
        return a_t, b_t, s

    @torch.no_grad()
    def fill(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Copy one adapter's A [r, in] and B [out, r] into `slot`, zero-padding to max_rank."""
        r = a.shape[0]
        self.clear(slot)
        self.routing.generation += 1
        self.lora_A_t[slot, :, :r].copy_(a.T, non_blocking=True)
        self.lora_B_t[slot, :r].copy_(b.T, non_blocking=True)
        self.scale[slot] = scale

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        self.routing.generation += 1
        self.lora_A_t[slot].zero_()
        self.lora_B_t[slot].zero_()
        self.scale[slot] = 0.0

    def read(self, slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's unpadded A [r, in] and B [out, r], as host copies."""
        a = self.lora_A_t[slot, :, :rank].T.to("cpu", copy=True).contiguous()
        b = self.lora_B_t[slot, :rank].T.to("cpu", copy=True).contiguous()
        return a, b
