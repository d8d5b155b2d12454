"""Hostile adapter files: every one refused with a specific reason, quickly, naming no server path;
and peft's matching rules kept exactly on the bounded (RE2) engine."""

import json
import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from loramux.server.adapters.adapter_config import LoraConfigView, parse_config, view_of
from loramux.server.adapters.checkpoint import read_checkpoint
from loramux.server.errors import LoramuxError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# Each must be refused in well under this (Python's re needs minutes for the first two).
BOUND_S = 2.0


@pytest.fixture(scope="module")
def view(assets, base_model):
    return base_model.view(assets.settings())


def refused(path, view, root=None):
    started = time.perf_counter()
    with pytest.raises(LoramuxError) as e:
        read_checkpoint(path, view, root=root or path.parent)
    assert time.perf_counter() - started < BOUND_S
    assert str(path.parent) not in e.value.message and "/proc" not in e.value.message
    return e.value


def with_config(assets, name, **changes):
    path = assets.copy_adapter("qv-r4", name)
    cfg = json.loads((path / CONFIG).read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / CONFIG).write_text(json.dumps(cfg))
    return path


CATASTROPHIC = "([a-z._0-9]+)+Z"
CASES = {
    # field -> (value, reason)
    # Python's re runs for minutes on these against a module name (holding the GIL).
    "catastrophic target regex": (dict(target_modules=CATASTROPHIC), "ADAPTER_CONFIG_INVALID"),
    "catastrophic rank pattern": (dict(rank_pattern={CATASTROPHIC: 2}), None),
    "look-around pattern": (dict(target_modules="(?=q_proj).*"), "ADAPTER_CONFIG_INVALID"),
    "back-reference": (dict(rank_pattern={r"(q)\1": 2}), "ADAPTER_CONFIG_INVALID"),
    "invalid regex": (dict(alpha_pattern={"([": 2}), "ADAPTER_CONFIG_INVALID"),
    "non-numeric alpha pattern": (dict(alpha_pattern={"q_proj": "lots"}), "ADAPTER_CONFIG_INVALID"),
    "infinite alpha": (dict(lora_alpha=1e999), "ADAPTER_CONFIG_INVALID"),
    "NaN alpha pattern": (dict(alpha_pattern={"v_proj": float("nan")}), "ADAPTER_CONFIG_INVALID"),
    "string rank": (dict(r="4"), "ADAPTER_CONFIG_INVALID"),
    "float rank pattern": (dict(rank_pattern={"v_proj": 2.5}), "ADAPTER_CONFIG_INVALID"),
    "huge pattern": (dict(target_modules="q" * 5000), "ADAPTER_CONFIG_INVALID"),
    "too many targets": (dict(target_modules=[f"m{i}" for i in range(5000)]), "ADAPTER_CONFIG_INVALID"),
    "non-string target": (dict(target_modules=[1, 2]), "ADAPTER_CONFIG_INVALID"),
    "no targets": (dict(target_modules=None), "ADAPTER_CONFIG_INVALID"),
    "bad layers_to_transform": (dict(layers_to_transform=["0"]), "ADAPTER_CONFIG_INVALID"),
    "long integer": (dict(r=10**5000), "ADAPTER_CONFIG_INVALID"),
    "not LoRA": (dict(peft_type="IA3"), "ADAPTER_UNSUPPORTED"),
    "DoRA without magnitudes": (dict(use_dora=True), "ADAPTER_WEIGHTS_MISSING"),
    "use_dora not a boolean": (dict(use_dora="yes"), "ADAPTER_CONFIG_INVALID"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_config_refused_with_its_reason(assets, view, case):
    changes, reason = CASES[case]
    if case == "long integer":
        path = with_config(assets, "hostile")
        text = (path / CONFIG).read_text().replace('"r": 4', '"r": ' + "9" * 5000)
        (path / CONFIG).write_text(text)
    else:
        path = with_config(assets, "hostile", **changes)
    if reason is None:  # a pathological pattern that RE2 matches in linear time: loads, with peft's meaning
        started = time.perf_counter()
        spec, _ = read_checkpoint(path, view, root=path.parent)
        assert time.perf_counter() - started < BOUND_S and spec.rank == 4
        return
    assert refused(path, view).reason == reason


def test_deep_nesting_and_size(assets, view):
    path = with_config(assets, "nested")
    cfg = json.loads((path / CONFIG).read_text())
    cfg["junk"] = json.loads("[" * 200 + "]" * 200)
    (path / CONFIG).write_text(json.dumps(cfg))
    assert refused(path, view).reason == "ADAPTER_CONFIG_INVALID"
    (path / CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    assert refused(path, view).reason == "ADAPTER_CONFIG_INVALID"
    (path / CONFIG).write_text(json.dumps({"peft_type": "LORA", "pad": "x" * (2 << 20)}))
    error = refused(path, view)
    assert error.reason == "ADAPTER_CONFIG_INVALID" and "larger than" in error.message


def test_links_out_of_the_root_are_refused_at_every_level(assets, view, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / CONFIG).write_text((assets.adapters / "qv-r4" / CONFIG).read_text())
    for target in (CONFIG, WEIGHTS):
        path = assets.copy_adapter("qv-r4", f"link-{target}")
        (path / target).unlink()
        source = outside / CONFIG if target == CONFIG else assets.adapters / "qv-r4" / WEIGHTS
        if target == WEIGHTS:
            (outside / WEIGHTS).write_bytes(source.read_bytes())
            source = outside / WEIGHTS
        (path / target).symlink_to(source)
        error = refused(path, view, root=assets.adapters)
        assert error.reason == "SOURCE_OUTSIDE_ROOT" and str(outside) not in error.message
    # A link to a special file (would block forever) and a link loop.
    path = assets.copy_adapter("qv-r4", "link-special")
    (path / WEIGHTS).unlink()
    (path / WEIGHTS).symlink_to("/dev/zero")
    assert refused(path, view, root=assets.adapters).reason == "SOURCE_OUTSIDE_ROOT"
    (path / WEIGHTS).unlink()
    os.mkfifo(path / WEIGHTS)
    assert refused(path, view, root=assets.adapters).reason == "ADAPTER_WEIGHTS_MISSING"
    (path / WEIGHTS).unlink()
    (path / WEIGHTS).symlink_to(path / WEIGHTS)
    assert refused(path, view, root=assets.adapters).reason == "ADAPTER_WEIGHTS_MISSING"


def hostile_corpus(assets) -> dict[str, str]:
    """Adapter directories under the adapter root, each hostile in its own way -> the reason it must get."""
    corpus = {}
    for i, (case, (changes, reason)) in enumerate(sorted(CASES.items())):
        if reason is not None and case != "long integer":
            with_config(assets, f"corpus-{i}", **changes)
            corpus[f"corpus-{i}"] = reason
    path = assets.copy_adapter("qv-r4", "corpus-header")
    (path / WEIGHTS).write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    corpus["corpus-header"] = "ADAPTER_CORRUPT"
    path = assets.copy_adapter("qv-r4", "corpus-fifo")
    (path / WEIGHTS).unlink()
    os.mkfifo(path / WEIGHTS)
    corpus["corpus-fifo"] = "ADAPTER_WEIGHTS_MISSING"
    path = assets.copy_adapter("qv-r4", "corpus-link")
    (path / CONFIG).unlink()
    (path / CONFIG).symlink_to("/proc/self/environ")
    corpus["corpus-link"] = "SOURCE_OUTSIDE_ROOT"
    path = assets.copy_adapter("qv-r4", "corpus-nested")
    (path / CONFIG).write_text("[" * 50_000 + "]" * 50_000)
    corpus["corpus-nested"] = "ADAPTER_CONFIG_INVALID"
    return corpus


def _header_file(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    (path / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_hostile_safetensors_headers(assets, view):
    path = assets.copy_adapter("qv-r4", "header")
    (path / WEIGHTS).write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    assert refused(path, view).reason == "ADAPTER_CORRUPT"
    _header_file(path, {f"base_model.model.t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for i in range(100_001)}, b"\0" * 4)
    assert refused(path, view).reason == "ADAPTER_CORRUPT"
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    # A tensor far larger than the layer allows is refused from its header, before any data is read.
    _header_file(path, {key: {"dtype": "F32", "shape": [4, 1 << 30], "data_offsets": [0, 16 << 30]}})
    assert refused(path, view).reason in ("ADAPTER_CORRUPT", "ADAPTER_INCOMPATIBLE")
    _header_file(path, {key: {"dtype": "I64", "shape": [4, 64], "data_offsets": [0, 2048]}}, b"\0" * 2048)
    assert refused(path, view).reason == "ADAPTER_CORRUPT"
    _header_file(path, {"base_model.model." + "x" * 5000: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    assert refused(path, view).reason == "ADAPTER_CORRUPT"
    _header_file(path, {"base_model.model." + "a." * 2000 + "lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    assert refused(path, view).reason == "ADAPTER_CORRUPT"


def test_huge_finite_weights_overflowing_the_dtype_are_refused(assets, view, base_model):
    import torch
    from safetensors.torch import load_file, save_file

    path = assets.copy_adapter("qv-r4", "overflow")
    tensors = load_file(str(path / WEIGHTS))
    key = next(iter(tensors))
    tensors[key] = tensors[key].double() * 1e300
    save_file(tensors, str(path / WEIGHTS))
    assert refused(path, view).reason == "ADAPTER_CORRUPT"
    assert base_model.dtype == torch.float32


# -- peft's matching rules, on RE2 ---------------------------------------------------------

MODULE_NAMES = [
    f"model.layers.{i}.{block}.{proj}"
    for i in range(12)
    for block, projs in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
    for proj in projs
] + ["lm_head", "model.embed_tokens", "model.layers.1.mlp.experts.3.up_proj"]

CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=r".*\.(q|k)_proj"),
    dict(target_modules=r"model\.layers\.[0-3]\..*"),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[0, 2, 11]),
    dict(target_modules=["up_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["up_proj"], layers_to_transform=[3], layers_pattern=["experts", "layers"]),
    dict(target_modules=["q_proj", "v_proj", "down_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]),
    dict(target_modules=["q_proj", "o_proj"], exclude_modules=r".*layers\.1\..*"),
    dict(target_modules=["lm_head", "q_proj"]),
]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_target_matching_equals_peft(config):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    peft_config = LoraConfig(**config)
    ours = view_of({"peft_type": "LORA", "r": 4, **config})
    for name in MODULE_NAMES:
        found = check_target_module_exists(peft_config, name)
        expected = bool(found) and not isinstance(found, _ExcludedModule)
        assert ours.targets(name) == expected, (config, name)


def test_rank_and_alpha_patterns_equal_peft():
    from peft.utils.other import get_pattern_key

    rank_pattern = {"q_proj": 2, r"layers\.1\.mlp\..*": 6, "v_proj": 3}
    alpha_pattern = {r"self_attn\.o_proj": 5, "down_proj": 7}
    ours = view_of({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern})
    for name in MODULE_NAMES:
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), 4)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), 8)
        assert (ours.rank_of(name), ours.alpha_of(name)) == (r, alpha), name


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(
    st.sampled_from(["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "layers_to_transform",
                     "layers_pattern", "exclude_modules", "modules_to_save", "use_rslora", "base_model_name_or_path"]),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
        lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5),
        max_leaves=20,
    ),
))
def test_any_config_is_accepted_or_refused_with_config_invalid(fields):
    raw = json.dumps({"peft_type": "LORA", **fields}).encode()
    started = time.perf_counter()
    try:
        ours = view_of(parse_config(raw))
    except LoramuxError as e:
        assert e.reason == "ADAPTER_CONFIG_INVALID", e
    else:
        assert isinstance(ours, LoraConfigView)
        for name in MODULE_NAMES[:20]:
            ours.targets(name)
            assert ours.rank_of(name) >= 1
    assert time.perf_counter() - started < BOUND_S


KEYS = [f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{w}.weight" for i in (0, 1) for p in ("q_proj", "v_proj") for w in "AB"]
KEYS += ["base_model.model.lm_head.weight", "base_model.model.model.norm.weight", "nope", "base_model.model.x.lora_A.weight"]
ACCEPTED_REASONS = {"ADAPTER_CORRUPT", "ADAPTER_INCOMPATIBLE", "ADAPTER_UNSUPPORTED", "ADAPTER_MODIFIES_BASE",
                    "ADAPTER_WEIGHTS_MISSING", "ADAPTER_CONFIG_INVALID", "ADAPTER_RANK_TOO_LARGE"}


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    header=st.dictionaries(
        st.one_of(st.sampled_from(KEYS), st.text(max_size=30)),
        st.fixed_dictionaries({
            "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F64", "X"]),
            "shape": st.lists(st.integers(-2, 2**40), max_size=3),
            "data_offsets": st.lists(st.integers(-4, 2**40), min_size=0, max_size=3),
        }),
        max_size=6,
    ),
    data=st.binary(max_size=512),
)
def test_generated_safetensors_headers_are_refused_with_a_reason(assets, view, header, data):
    path = assets.adapters / "gen-header"
    if not path.exists():
        assets.copy_adapter("qv-r4", "gen-header")
    _header_file(path, header, data)
    started = time.perf_counter()
    try:
        read_checkpoint(path, view, root=path.parent)
    except LoramuxError as e:
        assert e.reason in ACCEPTED_REASONS, e
    assert time.perf_counter() - started < BOUND_S
