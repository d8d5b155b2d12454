"""Weighted combinations of LoRA adapters: peft's `add_weighted_adapter`, computed here.

Every method gives a new LoRA adapter (A, B per module and a PEFT config), as peft's does:
- `cat`: the weighted factors side by side (rank = the sum of the ranks); exact.
- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: A and B combined
  separately (each adapter's weight times its scale split as a square root between them);
  every adapter must have the same rank.
- `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: the full
  weight deltas combined, then factored by SVD to `svd_rank` (default: the largest rank);
  exact when that rank holds the combination.
The new config is the first adapter's with r = lora_alpha = the new rank, no rank or alpha
patterns, and the union of the target modules, as peft writes it. `dare_*` prune at random:
`seed` seeds torch's generator first, and modules are visited in the model's order (A's, then
B's, adapter by adapter), so a seeded combination repeats, and equals peft's under the same
seed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from loramux.server.lora.weights import AdapterWeights, ModuleLora
from loramux.server.errors import InvalidRequest
from loramux.server.settings import ALL_LINEAR

METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
           "magnitude_prune", "magnitude_prune_svd")
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_DENSITY = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd", "magnitude_prune",
                 "magnitude_prune_svd")
MAX_ADAPTERS = 16
MAX_SVD_RANK = 4096  # a larger rank would be written into the config of an adapter no one could load


@dataclasses.dataclass(frozen=True)
class Combination:
    method: str
    weights: tuple[float, ...]
    svd_rank: int | None = None
    svd_clamp: float | None = None  # a quantile in (0, 1]
    density: float | None = None
    majority_sign_method: str = "total"
    seed: int = 0

    def check(self, count: int) -> None:
        def bad(field: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"combination {field}: {why}", field=f"combination.{field}", reason="COMBINATION_INVALID")

        if self.method not in METHODS:
            raise bad("method", f"{self.method!r} is not one of {', '.join(METHODS)}")
        if not 1 <= count <= MAX_ADAPTERS or len(self.weights) != count:
            raise bad("adapters", f"1 to {MAX_ADAPTERS} adapters, each with a weight")
        if not all(math.isfinite(w) for w in self.weights):
            raise bad("adapters", "weights must be finite")
        if self.method in NEEDS_DENSITY and (self.density is None or not 0 < self.density <= 1):
            raise bad("density", f"{self.method} needs a density in (0, 1]")
        if self.majority_sign_method not in ("total", "frequency"):
            raise bad("majority_sign_method", "must be total or frequency")
        if self.svd_rank is not None and not 1 <= self.svd_rank <= MAX_SVD_RANK:
            raise bad("svd_rank", f"must be 1 to {MAX_SVD_RANK}")
        if self.svd_clamp is not None and not 0 < self.svd_clamp <= 1:
            raise bad("svd_clamp", "must be a quantile in (0, 1]")


def peft_rank(config: dict) -> int:
    """The rank peft gives an adapter when combining: r, or the largest of its rank pattern."""
    pattern = config.get("rank_pattern") or {}
    return max([int(config["r"]), *map(int, pattern.values())])


def combined_config(configs: Sequence[dict], method: str, svd_rank: int | None) -> dict:
    """The new adapter's PEFT config, as add_weighted_adapter writes it."""
    if any(c.get("use_dora") for c in configs):
        raise InvalidRequest("DoRA adapters cannot be combined (peft's add_weighted_adapter combines LoRA factors)",
                             field="combination.adapters", reason="COMBINATION_INVALID")
    method = "linear" if len(configs) == 1 else method
    ranks = [peft_rank(c) for c in configs]
    if method in SAME_RANK:
        if len(set(ranks)) != 1:
            raise InvalidRequest(f"{method} combines adapters of one rank; these have ranks {ranks} (use cat or svd)",
                                 field="combination.method", reason="COMBINATION_INVALID")
        rank = ranks[0]
    elif method == "cat":
        rank = sum(ranks)
    else:
        rank = svd_rank or max(ranks)
    targets = [c.get("target_modules") for c in configs]
    if any(isinstance(t, str) and t.lower() == ALL_LINEAR for t in targets):
        union: object = ALL_LINEAR  # peft's every linear layer: whatever the others target is within it
    elif len({type(t) for t in targets}) != 1:
        raise InvalidRequest("the adapters name their target modules differently (a pattern and a list)",
                             field="combination.adapters", reason="COMBINATION_INVALID")
    elif isinstance(targets[0], str):
        union = "|".join(f"({t})" for t in targets)
    else:
        union = sorted(set().union(*map(set, targets)))
    config = dict(configs[0])
    config.update(r=rank, lora_alpha=rank, target_modules=union, alpha_pattern={}, rank_pattern={})
    return config


def combine(
    weights: Sequence[AdapterWeights], configs: Sequence[dict], combination: Combination, module_order: Sequence[str],
) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(config, {module: (A, B)}) of the combined adapter, in float32 on the CPU.
    `module_order` is the base model's module names in order (the order peft visits them)."""
    combination.check(len(weights))
    if any(c.get("use_dora") for c in configs):
        raise InvalidRequest("DoRA adapters cannot be combined (peft's add_weighted_adapter combines LoRA factors)",
                             field="combination.adapters", reason="COMBINATION_INVALID")
    config = combined_config(configs, combination.method, combination.svd_rank)
    method = "linear" if len(weights) == 1 else combination.method
    rank = int(config["r"])
    present = set().union(*(w.modules for w in weights))
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(combination.seed)
    try:
        factors = {}
        for module in (m for m in dict.fromkeys(module_order) if m in present):  # each once, in the model's order
            loras = [(w.modules[module], weight) for w, weight in zip(weights, combination.weights) if module in w.modules]
            if method == "cat":
                factors[module] = _cat(loras, rank)
            elif method.endswith("svd"):
                factors[module] = _svd(loras, method, rank, combination)
            else:
                factors[module] = _factorwise(loras, method, combination)
    finally:
        torch.random.set_rng_state(generator_state)
    return config, factors


def _cat(loras: list[tuple[ModuleLora, float]], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([lora.a.float() * weight * lora.scale for lora, weight in loras], dim=0)
    b = torch.cat([lora.b.float() for lora, _ in loras], dim=1)
    new_a = torch.zeros(rank, a.shape[1])
    new_b = torch.zeros(b.shape[0], rank)
    new_a[: a.shape[0]] = a
    new_b[:, : b.shape[1]] = b
    return new_a, new_b


def _factorwise(loras: list[tuple[ModuleLora, float]], method: str, c: Combination) -> tuple[torch.Tensor, torch.Tensor]:
    weights_a, weights_b = [], []
    for lora, weight in loras:
        scaled = weight * lora.scale
        sign = 1 if scaled >= 0 else -1
        weights_a.append(math.sqrt(abs(scaled)) * sign)
        weights_b.append(math.sqrt(abs(scaled)))
    tensors_a = [lora.a.float() for lora, _ in loras]
    tensors_b = [lora.b.float() for lora, _ in loras]
    if len({t.shape for t in tensors_a}) != 1 or len({t.shape for t in tensors_b}) != 1:
        raise InvalidRequest(f"{method} needs every adapter to have one rank in each module (use cat or svd)",
                             field="combination.method", reason="COMBINATION_INVALID")
    return (_mix(tensors_a, torch.tensor(weights_a), method, c), _mix(tensors_b, torch.tensor(weights_b), method, c))


def _svd(loras: list[tuple[ModuleLora, float]], method: str, rank: int, c: Combination) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [(lora.b.float() @ lora.a.float()) * lora.scale for lora, _ in loras]
    delta = _mix(deltas, torch.tensor([w for _, w in loras]), method.removesuffix("_svd") if method != "svd" else "linear", c)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # the same leading factors as peft's full SVD, at a fraction of the memory
    u = u[:, :rank] @ torch.diag(s[:rank])
    vh = vh[:rank, :]
    if c.svd_clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), c.svd_clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh, u


def _mix(tensors: list[torch.Tensor], weights: torch.Tensor, method: str, c: Combination) -> torch.Tensor:
    """peft's merge_utils, by name: task arithmetic, TIES, DARE and magnitude pruning."""
    if method == "linear":
        return _weighted_sum(torch.stack(tensors), weights)
    if method == "magnitude_prune":
        return _weighted_sum(torch.stack([_prune_magnitude(t, c.density) for t in tensors]), weights)
    if method == "dare_linear":
        return _weighted_sum(torch.stack([_prune_random(t, c.density) for t in tensors]), weights)
    if method in ("ties", "dare_ties"):
        prune = _prune_magnitude if method == "ties" else _prune_random
        stacked = torch.stack([prune(t, c.density) for t in tensors])
        sign = stacked.sign()
        magnitude = stacked.sum(dim=0) if c.majority_sign_method == "total" else sign.sum(dim=0)
        mask = sign == torch.where(magnitude >= 0, 1, -1)
        weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
        return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)
    raise AssertionError(method)


def _weighted_sum(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))).sum(dim=0)


def _prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[top[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _prune_random(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
    return tensor * mask / density
