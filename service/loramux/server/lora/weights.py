"""An adapter's validated LoRA weights, keyed by the base model's module names."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class ModuleLora:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float  # alpha / r, or alpha / sqrt(r) with rslora
    magnitude: torch.Tensor | None = None  # DoRA: the trained magnitude per output feature [out], float32
    dora_scale: torch.Tensor | None = None  # DoRA: magnitude / ||W + scale B A|| per output row [out], float32

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclasses.dataclass
class AdapterWeights:
    modules: dict[str, ModuleLora]  # base module name ("model.layers.0.self_attn.q_proj") -> LoRA

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes + (m.dora_scale.nbytes if m.dora_scale is not None else 0)
                   for m in self.modules.values())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, pin_memory: bool = False) -> AdapterWeights:
        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device=device, dtype=dtype or t.dtype)
            return t.pin_memory() if pin_memory else t

        def keep(t: torch.Tensor | None) -> torch.Tensor | None:  # DoRA vectors stay float32
            return None if t is None else t.to(device=device)

        return AdapterWeights({n: ModuleLora(move(m.a), move(m.b), m.scale, keep(m.magnitude), keep(m.dora_scale))
                               for n, m in self.modules.items()})
