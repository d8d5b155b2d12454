"""The set of slot layers in one model, addressed as numbered adapter slots."""

from __future__ import annotations

import torch
from torch import nn

from loramux.server.lora.siblings import group_siblings
from loramux.server.lora.weights import AdapterWeights, ModuleLora
from loramux.server.lora.slot_linear import LoraRouting, RoutingPlan, SlotLinear, is_conv1d
from loramux.server.settings import ALL_LINEAR


def servable(module: nn.Module) -> bool:
    """A layer slots can wrap: an nn.Linear (or a subclass, such as Falcon's own Linear or a
    bitsandbytes Linear), or transformers' Conv1D. The wrapper calls the layer itself for the
    base output, so a subclass's own forward is kept."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def slot_targets(model: nn.Module, target_modules: tuple[str, ...]) -> list[str]:
    """The modules that get slots: those whose short name is in `target_modules`, or with
    `all-linear` (as peft reads it) every servable layer except the model's output layer."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    every = ALL_LINEAR in target_modules
    targets = set(target_modules)
    return [name for name, module in model.named_modules()
            if servable(module) and module is not output and (every or name.rsplit(".", 1)[-1] in targets)]


class SlotBank:
    """The one owner of accelerator adapter memory: wraps the model's Linears in SlotLinears,
    decides where each resident adapter lives (its slot), counts the bytes, and routes rows.

    The tiered cache decides *what* is resident (LRU, pins, requests using it) and calls
    `place`, `take_back` and `drop`; the batch names its rows' adapters by uid and gets a
    `plan`. Nothing else sees slot numbers. Slots run 0..num_slots-1; `base_slot`
    (== num_slots) is the empty slot for rows without an adapter. A slot holds its adapter at
    true rank: an empty slot costs nothing, a full one its adapter's size.
    """

    def __init__(self, model: nn.Module, target_modules: tuple[str, ...], num_slots: int, max_rank: int,
                 dtype: torch.dtype | None = None, kernel: str = "torch"):
        self.routing = LoraRouting()
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.layers: dict[str, SlotLinear] = {}
        for name in slot_targets(model, target_modules):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            layer = SlotLinear(model.get_submodule(name), num_slots, self.routing, dtype, kernel)
            setattr(parent, name.rsplit(".", 1)[-1], layer)
            self.layers[name] = layer
        if not self.layers:
            raise ValueError(f"the model has no Linear layer named any of {sorted(target_modules)}")
        self.siblings = group_siblings(self.layers)  # q/k/v and gate/up: one shrink launch each (triton kernel)
        self._uids: list[int | None] = [None] * num_slots  # slot -> adapter uid
        self._slot_of: dict[int, int] = {}  # adapter uid -> slot
        self._bytes: dict[int, int] = {}  # adapter uid -> its bytes here (true size)

    @property
    def base_slot(self) -> int:
        return self.num_slots

    @property
    def max_adapter_bytes(self) -> int:
        """The largest adapter this bank may hold: max_rank on every served module."""
        return self.bytes_at_rank(self.max_rank)

    def bytes_at_rank(self, rank: int) -> int:
        """The bytes of an adapter of `rank` on every served module, in the LoRA dtype."""
        return sum(rank * (layer.in_features + layer.out_features) * layer.element_size for layer in self.layers.values())

    def resident_bytes(self) -> int:
        """Accelerator bytes the slots' adapters hold (at their true sizes)."""
        return sum(layer.resident_bytes() for layer in self.layers.values())

    def adapter_bytes(self, weights: AdapterWeights) -> int:
        """What `weights` will take in a slot: its true size in the LoRA dtype."""
        return sum(
            (m.a.numel() + m.b.numel()) * self.layers[name].element_size for name, m in weights.modules.items()
        )

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Module name -> (in_features, out_features) for every served module."""
        return {name: (layer.in_features, layer.out_features) for name, layer in self.layers.items()}

    def transposed(self) -> frozenset[str]:
        """Served modules whose weight is held [in, out] (Conv1D)."""
        return frozenset(name for name, layer in self.layers.items() if layer.transposed)

    def stored_transposed(self) -> frozenset[str]:
        """Served modules whose weight the checkpoint's files hold [in, out] (Conv1D, also when
        bitsandbytes has turned it into a Linear): what a merge from the files must add B A to."""
        return frozenset(name for name, layer in self.layers.items() if layer.stored_transposed)

    # -- where adapters live: the one owner of accelerator adapter memory ---------------

    def place(self, uid: int, weights: AdapterWeights) -> int:
        """Put adapter `uid` in a free slot (the cache has made room); returns the slot."""
        if uid in self._slot_of:
            raise ValueError(f"adapter uid {uid} is already in slot {self._slot_of[uid]}")
        widest = max((lora.rank for lora in weights.modules.values()), default=0)
        if widest > self.max_rank:  # (checkpoints are refused above it; the kernels' results are this wide)
            raise ValueError(f"adapter uid {uid} has rank {widest}, above the bank's {self.max_rank}")
        slot = self._uids.index(None)  # ValueError when full: the cache must make room first
        for name, layer in self.layers.items():
            lora = weights.modules.get(name)
            if lora is not None:
                layer.fill(slot, lora.a, lora.b, lora.scale, lora.dora_scale)
        self._uids[slot] = uid
        self._slot_of[uid] = slot
        self._bytes[uid] = self.adapter_bytes(weights)
        return slot

    def take_back(self, uid: int, like: AdapterWeights) -> AdapterWeights:
        """Copy adapter `uid` back to host memory (shaped like `like`: its ranks and scales) and
        free its slot. A DoRA adapter's scales per output row come back from the slot too (the
        magnitudes they were made from stay in the files, for merges)."""
        slot = self._slot_of[uid]
        modules = {}
        for name, lora in like.modules.items():
            a, b, dora = self.layers[name].read(slot, lora.rank)
            modules[name] = ModuleLora(a=a, b=b, scale=lora.scale, dora_scale=dora)
        self.drop(uid)
        return AdapterWeights(modules=modules)

    def drop(self, uid: int) -> None:
        """Free adapter `uid`'s slot; its memory goes back to the allocator."""
        slot = self._slot_of.pop(uid)
        for layer in self.layers.values():
            layer.clear(slot)
        self._uids[slot] = None
        del self._bytes[uid]

    def drop_all(self) -> None:
        """Free every slot (an engine that stops hands its adapter memory back)."""
        for uid in list(self._slot_of):
            self.drop(uid)

    def holds(self, uid: int) -> bool:
        return uid in self._slot_of

    def has_free_slot(self) -> bool:
        return None in self._uids

    def bytes_of(self, uid: int) -> int:
        return self._bytes[uid]

    def counted_bytes(self) -> int:
        """Bytes of the adapters placed here, as counted when they were placed."""
        return sum(self._bytes.values())

    def slot_table(self) -> tuple[int | None, ...]:
        """Slot -> uid of the adapter in it."""
        return tuple(self._uids)

    def plan(self, uids: list[int | None], device: torch.device) -> RoutingPlan | None:
        """The routing plan for rows using adapters `uids` (None: the base model alone); None when
        no row has an adapter. Every adapter named must be placed."""
        slots = [self.base_slot if uid is None else self._slot_of[uid] for uid in uids]
        groups: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot != self.base_slot:
                groups.setdefault(slot, []).append(row)
        if not groups:
            return None
        return RoutingPlan(
            slots=slots,
            groups=[(slot, torch.tensor(rows, dtype=torch.long, device=device)) for slot, rows in groups.items()],
            device=device,
            adapter_bytes=sum(self._bytes[self._uids[slot]] for slot in groups),
        )

    def has_dora(self, plan: RoutingPlan) -> bool:
        """Whether any adapter of the plan is a DoRA one (on any layer)."""
        slots = {slot for slot, _ in plan.groups}
        return any(slot in layer.dora for layer in self.layers.values() for slot in slots)

    def route(self, plan: RoutingPlan | None, tokens: int | None = None) -> None:
        """Route the rows of the next forward passes (a plan from `plan`, or None), each row
        `tokens` tokens long (a prefill's padded prompt length, 1 for a decode step)."""
        self.routing.plan = plan
        self.routing.tokens = tokens
        self.release_siblings()

    def release_siblings(self) -> None:
        """Drop every sibling group's held launch (a pass has ended or begins)."""
        for group in self.siblings:
            group.release()


