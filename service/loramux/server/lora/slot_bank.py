"""The set of slot layers in one model, addressed as numbered adapter slots."""

from __future__ import annotations

import torch
from torch import nn

from loramux.server.adapters.weights import AdapterWeights, ModuleLora
from loramux.server.lora.slot_linear import LoraRouting, RoutingPlan, SlotLinear


class SlotBank:
    """Owns the SlotLinear layers of a model: wraps them in, fills, clears and reads slots.

    Slot numbers run 0..num_slots-1; `base_slot` (== num_slots) is the empty slot for rows
    without an adapter. A slot holds its adapter at true rank: an empty slot costs nothing,
    and a full one its adapter's size (the tiered cache bounds the total in bytes).
    """

    def __init__(self, model: nn.Module, target_modules: tuple[str, ...], num_slots: int, max_rank: int):
        self.routing = LoraRouting()
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.layers: dict[str, SlotLinear] = {}
        targets = set(target_modules)
        for name, module in list(model.named_modules()):
            short = name.rsplit(".", 1)[-1]
            if short in targets and type(module) is nn.Linear:
                parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
                layer = SlotLinear(module, num_slots, self.routing)
                setattr(parent, short, layer)
                self.layers[name] = layer
        if not self.layers:
            raise ValueError(f"the model has no nn.Linear named any of {sorted(targets)}")

    @property
    def base_slot(self) -> int:
        return self.num_slots

    @property
    def max_adapter_bytes(self) -> int:
        """The largest adapter this bank may hold: max_rank on every served module."""
        return sum(
            self.max_rank * (layer.in_features + layer.out_features) * layer.base_layer.weight.element_size()
            for layer in self.layers.values()
        )

    def resident_bytes(self) -> int:
        """Accelerator bytes the slots' adapters hold (at their true sizes)."""
        return sum(layer.resident_bytes() for layer in self.layers.values())

    def adapter_bytes(self, weights: AdapterWeights) -> int:
        """What `weights` will take in a slot: its true size in the serving dtype."""
        return sum(
            (m.a.numel() + m.b.numel()) * self.layers[name].base_layer.weight.element_size() for name, m in weights.modules.items()
        )

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Module name -> (in_features, out_features) for every served module."""
        return {name: (layer.in_features, layer.out_features) for name, layer in self.layers.items()}

    def fill(self, slot: int, weights: AdapterWeights) -> None:
        self._check(slot)
        for name, layer in self.layers.items():
            lora = weights.modules.get(name)
            if lora is None:
                layer.clear(slot)
            else:
                layer.fill(slot, lora.a, lora.b, lora.scale)

    def clear(self, slot: int) -> None:
        self._check(slot)
        for layer in self.layers.values():
            layer.clear(slot)

    def read(self, slot: int, like: AdapterWeights) -> AdapterWeights:
        """Copy the adapter in `slot` back to host memory, shaped like `like` (its ranks and scales)."""
        self._check(slot)
        modules = {}
        for name, lora in like.modules.items():
            a, b = self.layers[name].read(slot, lora.rank)
            modules[name] = ModuleLora(a=a, b=b, scale=lora.scale)
        return AdapterWeights(modules=modules)

    def plan(self, slots: list[int], device: torch.device) -> RoutingPlan | None:
        """The routing plan for rows using `slots` (base_slot = no adapter); None when no row has one."""
        groups: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot != self.base_slot:
                groups.setdefault(slot, []).append(row)
        if not groups:
            return None
        return RoutingPlan(
            slots=list(slots),
            groups=[(slot, torch.tensor(rows, dtype=torch.long, device=device)) for slot, rows in groups.items()],
            device=device,
        )

    def route(self, plan: RoutingPlan | None) -> None:
        """Route the rows of the next forward passes (a plan from `plan`, or None)."""
        self.routing.plan = plan

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} is outside 0..{self.num_slots - 1}")
