"""Adapter validation against the served base: every case a precise reason, nothing half-loaded."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ADAPTERS
from loramux.demo.assets import build_model, make_adapter
from loramux.server.adapters.checkpoint import read_checkpoint
from loramux.server.errors import AdapterIncompatible, AdapterInvalid

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def view(assets, base_model):
    return base_model.view(assets.settings())


def edit_tensors(path, fn):
    tensors = load_file(str(path / WEIGHTS))
    fn(tensors)
    save_file(tensors, str(path / WEIGHTS))


def edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_spec_and_scales_follow_peft(assets, view):
    spec, weights = read_checkpoint(assets.adapters / "pattern", view)
    assert spec.rank == 4 and spec.alpha == 8 and not spec.use_rslora
    assert spec.target_modules == ("down_proj", "q_proj", "v_proj")
    q = weights.modules["model.layers.0.self_attn.q_proj"]
    v = weights.modules["model.layers.1.self_attn.v_proj"]
    down = weights.modules["model.layers.0.mlp.down_proj"]
    assert (q.rank, q.scale) == (4, 8 / 4)
    assert (v.rank, v.scale) == (2, 8 / 2)  # rank_pattern
    assert (down.rank, down.scale) == (4, 3 / 4)  # alpha_pattern
    assert len(weights.modules) == 6
    assert spec.content_hash.startswith("sha256:") and len(spec.content_hash) == 71
    spec, weights = read_checkpoint(assets.adapters / "rslora-r8", view)
    assert weights.modules["model.layers.0.mlp.up_proj"].scale == pytest.approx(8 / math.sqrt(8))
    # peft's own scaling for the same module agrees
    peft_layer = assets.peft_model("rslora-r8").base_model.model.model.layers[0].mlp.up_proj
    assert peft_layer.scaling["default"] == pytest.approx(8 / math.sqrt(8))


def test_truncated_file_is_corrupt(assets, view):
    path = assets.copy_adapter("qv-r4", "truncated")
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterInvalid) as e:
        read_checkpoint(path, view)
    assert e.value.reason == "ADAPTER_CORRUPT"


def test_garbage_config_is_refused(assets, view):
    path = assets.copy_adapter("qv-r4", "badconfig")
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterInvalid) as e:
        read_checkpoint(path, view)
    assert e.value.reason == "ADAPTER_CONFIG_INVALID"


def test_rank_above_limit(assets, base_model):
    small = base_model.view(assets.settings(max_lora_rank=8))
    with pytest.raises(AdapterIncompatible) as e:
        read_checkpoint(assets.adapters / "all-r16", small)
    assert e.value.reason == "ADAPTER_RANK_TOO_LARGE" and e.value.metadata == {"rank": "16", "max_lora_rank": "8"}


def test_other_base_model_refused_or_warned(assets, base_model, view, tmp_path):
    path = assets.copy_adapter("qv-r4", "otherbase")
    edit_config(path, base_model_name_or_path="meta-llama/Llama-3.1-8B")
    with pytest.raises(AdapterIncompatible) as e:
        read_checkpoint(path, view)
    assert e.value.reason == "ADAPTER_INCOMPATIBLE" and "Llama-3.1-8B" in e.value.message
    warn = base_model.view(assets.settings(base_mismatch="warn"))
    spec, _ = read_checkpoint(path, warn)
    assert spec.base_model == "meta-llama/Llama-3.1-8B"


def test_shapes_of_another_model_refused(assets, view, tmp_path):
    build_model(tmp_path / "wide", assets.tokenizer, hidden=96, intermediate=128)
    make_adapter(tmp_path / "wide", assets.adapters / "wide", r=4, base_model_name=str(assets.base))
    with pytest.raises(AdapterIncompatible) as e:
        read_checkpoint(assets.adapters / "wide", view)
    assert e.value.reason == "ADAPTER_INCOMPATIBLE" and "does not fit" in e.value.message


def test_pickle_weights_refused_unless_allowed(assets, base_model, view):
    path = assets.copy_adapter("qv-r4", "pickled")
    torch.save(load_file(str(path / WEIGHTS)), path / "adapter_model.bin")
    (path / WEIGHTS).unlink()
    with pytest.raises(AdapterIncompatible) as e:
        read_checkpoint(path, view)
    assert e.value.reason == "ADAPTER_PICKLE_REFUSED"
    spec, weights = read_checkpoint(path, base_model.view(assets.settings(allow_pickle_weights=True)))
    assert spec.rank == 4 and len(weights.modules) == 4


def test_modules_to_save_that_change_the_base_are_refused(assets, view, base_model):
    path = assets.copy_adapter("qv-r4", "mts")
    head = base_model.model.lm_head.weight.detach().clone()
    edit_tensors(path, lambda t: t.__setitem__("base_model.model.lm_head.weight", head + 0.01))
    with pytest.raises(AdapterIncompatible) as e:
        read_checkpoint(path, view)
    assert e.value.reason == "ADAPTER_MODIFIES_BASE"
    # An unchanged copy of the base weight is harmless and accepted.
    edit_tensors(path, lambda t: t.__setitem__("base_model.model.lm_head.weight", head))
    spec, _ = read_checkpoint(path, view)
    assert spec.rank == 4


def test_module_not_served_and_module_missing(assets, base_model):
    qv_only = base_model.view(assets.settings())
    narrow = type(qv_only)(**{**qv_only.__dict__, "slot_shapes": {k: v for k, v in qv_only.slot_shapes.items() if "q_proj" in k}})
    with pytest.raises(AdapterIncompatible) as e:
        read_checkpoint(assets.adapters / "qv-r4", narrow)
    assert "does not serve adapters on" in e.value.message and e.value.metadata["module"].endswith("v_proj")
    path = assets.copy_adapter("qv-r4", "ghost")
    edit_tensors(path, lambda t: t.update({
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
        "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4),
    }))
    with pytest.raises(AdapterIncompatible) as e:
        read_checkpoint(path, qv_only)
    assert "has no module 'model.layers.9.self_attn.q_proj'" in e.value.message


def test_partial_file_and_unpaired_tensors(assets, view):
    path = assets.copy_adapter("qv-r4", "partial")
    edit_tensors(path, lambda t: [t.pop(k) for k in list(t) if "layers.1.self_attn.v_proj" in k])
    with pytest.raises(AdapterInvalid) as e:
        read_checkpoint(path, view)
    assert e.value.reason == "ADAPTER_WEIGHTS_MISSING" and e.value.metadata == {"missing": "1"}
    path = assets.copy_adapter("qv-r4", "unpaired")
    edit_tensors(path, lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"))
    with pytest.raises(AdapterInvalid) as e:
        read_checkpoint(path, view)
    assert e.value.reason == "ADAPTER_CORRUPT" and "not its pair" in e.value.message


def test_unsupported_variants(assets, view):
    path = assets.copy_adapter("qv-r4", "dora-no-magnitude")
    edit_config(path, use_dora=True)  # DoRA is served (test_dora.py), but needs its magnitudes
    with pytest.raises(AdapterInvalid) as e:
        read_checkpoint(path, view)
    assert e.value.reason == "ADAPTER_WEIGHTS_MISSING"
    path = assets.copy_adapter("qv-r4", "ia3")
    edit_config(path, peft_type="IA3")
    with pytest.raises(AdapterInvalid) as e:
        read_checkpoint(path, view)
    assert e.value.reason == "ADAPTER_UNSUPPORTED"


def test_non_finite_weights(assets, view):
    path = assets.copy_adapter("qv-r4", "nan")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    edit_tensors(path, lambda t: t[key].__setitem__((0, 0), float("nan")))
    with pytest.raises(AdapterInvalid) as e:
        read_checkpoint(path, view)
    assert e.value.reason == "ADAPTER_CORRUPT" and "non-finite" in e.value.message


def test_every_fixture_adapter_is_valid(assets, view):
    for name, kwargs in ADAPTERS.items():
        spec, _ = read_checkpoint(assets.adapters / name, view)
        assert spec.rank == kwargs["r"]
