"""Sibling layers: the projections a model calls on one input (q/k/v; gate/up), whose LoRA
shrinks run as one launch (`--lora-kernel triton`).

A decoder layer calls q_proj, k_proj and v_proj on the same hidden states, and gate_proj and
up_proj on the same input. With the Triton kernels, the first of a group to run (whichever it
is) shrinks the input for every sibling that has an adapter in the pass, in one launch over the
siblings' own slot tables; each sibling then finds its part and only expands. Five
shrink launches per decoder layer become two.

Little is assumed about the model's calls: a sibling takes the held result only when its
input is the very input the shrink read (the same memory, shape, strides and, outside
inference mode, version: an in-place change bumps it) in the same routing state (the same plan
or graph and slot weights), and its rows' slots and width are the ones used. The held input,
plan and runs are referenced while held, so no other tensor can take their memory meanwhile.
Otherwise it shrinks alone. Inference tensors carry no version, so the first `CHECKS` parts
each group hands out (outside a CUDA graph capture) are also computed alone and compared: a
model that changes the shared input in place between its siblings' calls (none in
transformers does) has its group turned off, with a warning, before it can serve a wrong
token. Groups are formed by name (`SIBLING_NAMES`) under one parent, with equal input width,
LoRA dtype and device; a model that names its projections otherwise runs each alone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from loramux.server.lora.slot_linear import KernelRuns, SlotLinear

log = logging.getLogger(__name__)

# Short names of layers models call on one input, per group.
SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
CHECKS = 4  # parts per group checked against a shrink of their own before they are trusted


@dataclasses.dataclass(eq=False)
class _Held:
    key: tuple  # the input's memory, shape, strides, dtype and version, and the routing state
    held: tuple  # the objects the key names, referenced while held (input, plan, graph)
    runs: dict[int, tuple[int, int]]  # layer position -> (its row slots' memory, width) used
    h: torch.Tensor  # [included, tokens, width] float32
    part: dict[int, int]  # layer position -> its part of h
    left: set[int]  # positions that have not taken their part yet


class Siblings:
    def __init__(self, layers: list[SlotLinear]):
        self.layers = layers
        self._held: _Held | None = None
        self.shared = 0  # shrinks served from a sibling's launch (diagnostics, tests)
        self.checks_left = CHECKS
        self.enabled = True  # False: a check found the shared input changed between calls

    @staticmethod
    def _key(x: torch.Tensor, tokens_per_row: int, layer: SlotLinear) -> tuple[tuple, tuple]:
        routing = layer.routing
        version = -1 if x.is_inference() else x._version
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, version, tokens_per_row,
               id(routing.plan), id(routing.graph), routing.generation)
        return key, (x, routing.plan, routing.graph)

    def release(self) -> None:
        """Let go of a held launch (at the end of a pass: a sibling the model did not call
        must not keep the input and the launch's result alive)."""
        self._held = None

    def shrunk(self, layer: SlotLinear, x: torch.Tensor, flat: Callable[[], torch.Tensor], runs: KernelRuns,
               tokens_per_row: int) -> torch.Tensor:
        """h [tokens, width] float32 for `layer` (its `runs` in this pass) over x: the part a
        sibling's launch made for it, or one launch now for it and every sibling with an
        adapter in the pass. `flat()`: x in the LoRA dtype, tokens flattened (made only when a
        launch runs)."""
        from loramux.server.lora.triton_kernels import shrink

        if not self.enabled:
            return shrink(flat(), [layer.tables], runs.slots, runs.max_rank, tokens_per_row)[0]
        pos = self.layers.index(layer)
        mine = (runs.slots.data_ptr(), runs.max_rank)
        got = self._held
        if got is not None and got.key == self._key(x, tokens_per_row, layer)[0] and pos in got.left and got.runs[pos] == mine:
            got.left.discard(pos)
            if not got.left:
                self._held = None
            part = got.h[got.part[pos]]
            if self.checks_left and not _capturing(x):
                self.checks_left -= 1
                # The same kernel at the same width: each program does exactly what it did in the launch.
                alone = shrink(flat(), [layer.tables], runs.slots, part.shape[-1], tokens_per_row)[0]
                if not _agree(part, alone, layer.tables.rank[runs.slots], tokens_per_row):
                    self.enabled, self._held = False, None
                    log.warning("LoRA shrinks of %d layers sharing an input no longer share a launch: the model "
                                "changed their input between their calls", len(self.layers))
                    return alone
            self.shared += 1
            return part
        included: list[tuple[int, SlotLinear, KernelRuns]] = []
        for i, sibling in enumerate(self.layers):
            theirs = runs if sibling is layer else sibling.kernel_runs()
            if theirs is not None and theirs.slots.data_ptr() == runs.slots.data_ptr():  # (one slots tensor per launch)
                included.append((i, sibling, theirs))
        key, held = self._key(x, tokens_per_row, layer)
        width = max(r.max_rank for _, _, r in included)
        h = shrink(flat(), [s.tables for _, s, _ in included], runs.slots, width, tokens_per_row)
        part = {i: n for n, (i, _, _) in enumerate(included)}
        left = set(part) - {pos}
        refs = tuple(r.slots for _, _, r in included)
        self._held = _Held(key, held + refs, {i: (r.slots.data_ptr(), r.max_rank) for i, _, r in included},
                           h, part, left) if left else None
        return h[part[pos]]


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _agree(part: torch.Tensor, alone: torch.Tensor, rank: torch.Tensor, tokens_per_row: int) -> bool:
    """Whether a held part equals a shrink of its own, bit for bit, within each row's rank."""
    rows_rank = rank.to(torch.long).repeat_interleave(tokens_per_row)  # [tokens]
    within = torch.arange(alone.shape[1], device=alone.device)[None, :] < rows_rank[:, None]
    return bool(torch.equal(part[within].nan_to_num(), alone[within].nan_to_num()))


def group_siblings(layers: dict[str, SlotLinear]) -> list[Siblings]:
    """Give each layer of a sibling group its `siblings` (under one parent, with equal input
    width, LoRA dtype and device); returns the groups. Only the Triton kernels use them."""
    groups = []
    for names in SIBLING_NAMES:
        by_parent: dict[tuple, list[SlotLinear]] = {}
        for name, layer in layers.items():
            parent, _, short = name.rpartition(".")
            if short in names:
                by_parent.setdefault((parent, layer.in_features, layer._dtype, layer._device), []).append(layer)
        for members in by_parent.values():
            if len(members) > 1:
                group = Siblings(members)
                for member in members:
                    member.siblings = group
                groups.append(group)
    return groups
