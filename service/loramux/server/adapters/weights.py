"""An adapter's validated LoRA weights, keyed by the base model's module names."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class ModuleLora:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float  # alpha / r, or alpha / sqrt(r) with rslora

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclasses.dataclass
class AdapterWeights:
    modules: dict[str, ModuleLora]  # base module name ("model.layers.0.self_attn.q_proj") -> LoRA

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, pin_memory: bool = False) -> AdapterWeights:
        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device=device, dtype=dtype or t.dtype)
            return t.pin_memory() if pin_memory else t

        return AdapterWeights({n: ModuleLora(move(m.a), move(m.b), m.scale) for n, m in self.modules.items()})
