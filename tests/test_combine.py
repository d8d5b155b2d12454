"""Weighted combinations against peft's add_weighted_adapter on the same adapters: the new
adapter's factors and config, method by method (exact methods bit for bit; SVD to float
rounding; DARE's random pruning against peft's own pruning functions under one seed)."""

from __future__ import annotations

import json

import pytest
import torch

from loramux.server.adapters.checkpoint import read_checkpoint
from loramux.server.merging.combine import Combination, combine
from loramux.server.errors import InvalidRequest

PAIR = ("qv-r4", "all-r16")  # different ranks and targets: cat, svd
SAME = ("qv-r4", "pattern")  # rank 4 both (pattern's v_proj is rank 2: factorwise methods refuse per module)


@pytest.fixture(scope="module")
def view(assets, base_model):
    return base_model.view(assets.settings())


def ours(assets, view, base_model, names, combination):
    weights, configs = [], []
    for name in names:
        _, w = read_checkpoint(assets.adapters / name, view, dtype=torch.float32, root=assets.adapters / name)
        weights.append(w)
        configs.append(json.loads((assets.adapters / name / "adapter_config.json").read_text()))
    order = [n.replace(".base_layer", "") for n, _ in base_model.model.named_modules()]
    return combine(weights, configs, combination, order)


def peft_combined(assets, names, weights, method, **kwargs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(assets.base), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(assets.adapters / names[0]), adapter_name="a0")
    for i, name in enumerate(names[1:], 1):
        model.load_adapter(str(assets.adapters / name), adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(names))], list(weights), "mix", combination_type=method, **kwargs)
    factors = {}
    for module_name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "mix" in module.lora_A:
            factors[module_name] = (module.lora_A["mix"].weight.detach(), module.lora_B["mix"].weight.detach())
    return model.peft_config["mix"], factors


@pytest.mark.parametrize("method, names, weights, kwargs", [
    ("cat", PAIR, (0.7, -0.4), {}),
    ("linear", ("qv-r4", "qv-r4"), (0.5, 0.25), {}),
    ("ties", ("qv-r4", "qv-r4"), (0.6, 0.6), {"density": 0.5}),
    ("magnitude_prune", ("qv-r4", "qv-r4"), (1.0, -0.5), {"density": 0.3}),
    ("svd", PAIR, (0.7, 0.3), {}),
    ("ties_svd", PAIR, (0.5, 0.5), {"density": 0.6, "majority_sign_method": "frequency"}),
    ("magnitude_prune_svd", PAIR, (0.5, 1.0), {"density": 0.4, "svd_rank": 6, "svd_clamp": 0.99}),
])
def test_combinations_equal_peft_add_weighted_adapter(assets, view, base_model, method, names, weights, kwargs):
    config, factors = ours(assets, view, base_model, names, Combination(method, weights, **kwargs))
    peft_config, peft_factors = peft_combined(assets, names, weights, method, **kwargs)
    assert config["r"] == config["lora_alpha"] == peft_config.r == peft_config.lora_alpha
    assert set(config["target_modules"]) == set(peft_config.target_modules)
    assert config["rank_pattern"] == config["alpha_pattern"] == {}
    assert factors.keys() == peft_factors.keys()
    for module, (a, b) in factors.items():
        pa, pb = peft_factors[module]
        if method.endswith("svd"):  # factors are unique up to sign per component: compare the product
            assert torch.allclose(b @ a, pb @ pa, atol=1e-5, rtol=1e-4), module
        else:
            assert torch.equal(a, pa) and torch.equal(b, pb), module


def test_dare_prunes_with_peft_functions_under_its_seed(assets, view, base_model):
    from peft.utils.merge_utils import dare_linear, dare_ties

    names, weights = ("qv-r4", "qv-r4"), (0.8, 0.4)
    for method, fn in (("dare_linear", dare_linear), ("dare_ties", dare_ties)):
        combination = Combination(method, weights, density=0.5, seed=11)
        config, factors = ours(assets, view, base_model, names, combination)
        again = ours(assets, view, base_model, names, combination)[1]
        assert all(torch.equal(factors[m][0], again[m][0]) for m in factors)  # seeded: repeatable
        # peft's own functions, visited in the documented order under the same seed.
        _, w = read_checkpoint(assets.adapters / "qv-r4", view, dtype=torch.float32, root=assets.adapters / "qv-r4")
        torch.manual_seed(11)
        for module in dict.fromkeys(n.replace(".base_layer", "") for n, _ in base_model.model.named_modules()):
            if module not in w.modules:
                continue
            lora = w.modules[module]
            scaled = [x * lora.scale for x in weights]
            wa = torch.tensor([abs(s) ** 0.5 * (1 if s >= 0 else -1) for s in scaled])
            wb = torch.tensor([abs(s) ** 0.5 for s in scaled])
            kwargs = {"majority_sign_method": "total"} if method == "dare_ties" else {}
            a = fn([lora.a, lora.a], wa, 0.5, **kwargs)
            b = fn([lora.b, lora.b], wb, 0.5, **kwargs)
            assert torch.equal(a, factors[module][0]) and torch.equal(b, factors[module][1]), (method, module)
        zeroed = sum(int((factors[m][0] == 0).sum()) for m in factors)
        assert zeroed > 0  # it did prune


def test_combinations_are_checked(assets, view, base_model):
    for combination, names, what in [
        (Combination("linear", (1.0, 1.0)), PAIR, "one rank"),
        (Combination("ties", (1.0, 1.0)), SAME, "density"),
        (Combination("blend", (1.0,)), ("qv-r4",), "is not one of"),
        (Combination("cat", (1.0,)), PAIR, "each with a weight"),
        (Combination("svd", (float("nan"), 1.0)), PAIR, "finite"),
        (Combination("svd", (1.0, 1.0), svd_rank=2**31 - 1), PAIR, "1 to 4096"),
    ]:
        with pytest.raises(InvalidRequest) as e:
            ours(assets, view, base_model, names, combination)
        assert e.value.reason == "COMBINATION_INVALID" and what in e.value.message, e.value.message
