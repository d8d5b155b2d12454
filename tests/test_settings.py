import pytest

from loramux.server.errors import InvalidSettings
from loramux.server.settings import Settings


@pytest.mark.parametrize("field,value", [
    ("dtype", "int4"), ("device", "tpu"), ("adapter_slots", 0), ("max_lora_rank", 0), ("port", 70000),
    ("batch_window_ms", -1), ("base_mismatch", "ignore"), ("target_modules", ()), ("max_batch_size", 0),
    ("scheduling", "fifo"), ("adapter_wait_ms", -5), ("max_batch_tokens", 1), ("max_prefill_tokens", 0),
    ("max_queue_per_tenant", 10_000), ("max_queue_per_tenant", 0), ("join_ratio", -1), ("join_max_steps", -1),
    ("adapter_memory_mib", 0), ("adapter_memory_mib", float("inf")), ("slot_wait_s", float("nan")),
    ("engine_stall_s", 0), ("shutdown_grace_s", float("inf")), ("max_prompt_bytes", 0), ("auth", "basic"),
    ("kv_cache", "paged"), ("kv_cache_tokens", 1),
])
def test_invalid_settings_name_the_field(tmp_path, field, value):
    with pytest.raises(InvalidSettings) as e:
        Settings(model="m", **{"auth": "none", field: value})
    assert e.value.field == field and e.value.reason == "INVALID_SETTINGS"


def test_roots_are_resolved_and_must_exist(tmp_path):
    s = Settings(model="m", auth="none", adapter_roots=(str(tmp_path / "."),), merge_root=tmp_path / "merge")
    assert s.adapter_roots == (tmp_path.resolve(),) and s.merge_root.is_dir()
    with pytest.raises(InvalidSettings) as e:
        Settings(model="m", auth="none", adapter_roots=(tmp_path / "missing",))
    assert e.value.field == "adapter_roots"


def test_per_tenant_queue_has_no_fixed_bound_by_default():
    assert Settings(model="m", auth="none", max_queue=7).max_queue_per_tenant is None


def test_api_keys_are_the_default_and_need_a_keys_file(tmp_path):
    with pytest.raises(InvalidSettings) as e:
        Settings(model="m")
    assert e.value.field == "auth_keys_file" and "--auth none" in e.value.message
    s = Settings(model="m", auth_keys_file=tmp_path / "keys.yaml")
    assert s.auth == "keys" and s.auth_keys_file == (tmp_path / "keys.yaml").resolve()


@pytest.mark.parametrize("other", [{"quantization": "bnb-8bit"}, {"quantization": "bnb-4bit"}, {"device_map": "auto"}])
def test_compile_is_refused_with_what_does_not_trace_into_one_graph(other):
    with pytest.raises(InvalidSettings) as e:
        Settings(model="m", auth="none", compile=True, **other)
    assert e.value.field == "compile"


def test_an_option_whose_extra_is_missing_fails_at_start_up_naming_it(monkeypatch):
    import importlib.util

    from loramux.server.settings import check_installed

    real = importlib.util.find_spec
    absent = {"torchao", "bitsandbytes", "s3fs"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    check_installed(Settings(model="m", auth="none"))  # the defaults need no extra
    for settings, field, extra in [
        (Settings(model="m", auth="none", quantization="int8"), "quantization", "quant"),
        (Settings(model="m", auth="none", quantization="bnb-4bit"), "quantization", "quant"),
        (Settings(model="m", auth="none", object_roots=("s3://b/adapters",)), "object_roots", "s3"),
        (Settings(model="m", auth="none", registry="s3://b/registry"), "registry", "s3"),
    ]:
        with pytest.raises(InvalidSettings) as e:
            check_installed(settings)
        assert e.value.field == field and f"pip install 'loramux[{extra}]'" in e.value.message
