"""Merging at any size: streamed from a sharded base's safetensors files, equal to peft's
merge_and_unload + save_pretrained bit for bit (float32), with the server's peak memory read
during the merge; output shards, index, manifest; cancel and delete; the output served."""

from __future__ import annotations

import hashlib
import json
import re
import threading

import pytest
import torch
from safetensors import safe_open

import loramux.client as lc
from conftest import PROMPTS
from loramux.demo.assets import build_model, make_adapter
from loramux.server.app import BackgroundServer
from loramux.server.merging.base_files import read_base_checkpoint
from loramux.server.errors import MergeUnsupported

N = 8
# hidden 512, 8 layers: about 92 MB of float32 weights in shards of at most 12 MB.
MODEL = dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1536, tie_embeddings=True, max_shard_size="12MB")


@pytest.fixture(scope="module")
def sharded(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    build_model(root / "base", assets.tokenizer, seed=3, init_std=0.02, **MODEL)
    make_adapter(root / "base", root / "adapters" / "wide", r=8, alpha=16, use_rslora=True, std=0.05, seed=7,
                 target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                 rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 4})
    settings = assets.settings(model=str(root / "base"), adapter_roots=(root / "adapters",), merge_root=root / "merged",
                               max_lora_rank=8)
    server = BackgroundServer(settings)
    client = lc.Client(server.target, timeout=120)
    client.load_adapter("wide", source="wide")
    yield root, server, client
    client.close()
    server.stop()


def peft_merged(root):
    """peft's own answer: merge_and_unload, then save_pretrained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = root / "peft-merged"
    if not out.exists():
        base = AutoModelForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(root / "adapters" / "wide")).merge_and_unload()
        merged.save_pretrained(str(out))
    return out


def tensors(directory) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                found[name] = f.get_tensor(name)
    return found


def vm(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def test_a_sharded_base_merges_as_peft_does_in_bounded_memory(sharded):
    root, server, client = sharded
    checkpoint = read_base_checkpoint(root / "base")
    assert len(checkpoint.shards) >= 4
    oracle = tensors(peft_merged(root))

    def merge_peak(output_dir: str):
        rss = vm("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # the peak from now on (this process is the server)
            f.write("5")
        result = client.merge("wide", output_dir).result(timeout=300)
        return result, vm("VmHWM") - rss

    first_result, first_peak = merge_peak("first")  # a fresh server's first merge: libraries' one-time buffers too
    result, peak = merge_peak("out")
    out = root / "merged" / "default" / "out"
    got = tensors(out)
    assert got.keys() == oracle.keys() and "lm_head.weight" not in got  # tied: written once, as peft writes it
    assert all(torch.equal(got[k], oracle[k]) for k in got)  # float32: bit for bit
    assert result.merged_tensors == 8 * 7
    # Memory: one tensor with its float32 temporaries and the adapter, under one shard (the
    # target is two), far from the whole model, which merge_and_unload holds. A fresh server's
    # first merge also pays its libraries' one-time buffers (BLAS, allocator growth).
    adapter_bytes = (root / "adapters" / "wide" / "adapter_model.safetensors").stat().st_size
    steady = checkpoint.largest_shard_bytes + adapter_bytes + (8 << 20)
    first = 2 * checkpoint.largest_shard_bytes + adapter_bytes + (16 << 20)
    print(f"\nmerge peaks: first {first_peak / 2**20:.1f} MiB, then {peak / 2**20:.1f} MiB; model "
          f"{checkpoint.total_bytes / 2**20:.1f} MiB, largest shard {checkpoint.largest_shard_bytes / 2**20:.1f} MiB")
    assert peak < steady and first_peak < first < checkpoint.total_bytes, (first_peak, peak, steady, first)
    assert first_result.manifest_sha256 != "" and tensors(root / "merged" / "default" / "first").keys() == oracle.keys()

    # Shards no larger than the base's, an index naming every tensor, the files copied, a manifest.
    merged_checkpoint = read_base_checkpoint(out)
    assert merged_checkpoint.largest_shard_bytes <= checkpoint.largest_shard_bytes and len(merged_checkpoint.shards) >= 4
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got) and index["metadata"]["total_size"] == checkpoint.total_bytes
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (root / "base" / name).read_bytes()
    manifest = json.loads((out / "loramux_merge.json").read_text())
    assert result.manifest_sha256 == hashlib.sha256((out / "loramux_merge.json").read_bytes()).hexdigest()
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"loramux_merge.json"}
    for name, info in manifest["files"].items():
        assert info["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert manifest["adapters"] == [{"adapter_id": "wide", "source": "wide", "revision": client.get_adapter("wide").revision,
                                     "weight": 1.0}] and manifest["method"] == "lora" and manifest["output"] == "model"

    # The output serves as a plain model: its greedy tokens are base + adapter's.
    with BackgroundServer(server.engine.settings.__class__(**{**vars_of(server.engine.settings), "model": str(out),
                                                              "merge_root": None})) as plain:
        with lc.Client(plain.target, timeout=120) as c:
            for prompt in PROMPTS[:2]:
                assert c.generate(prompt=prompt, max_new_tokens=N).token_ids == \
                    client.generate(prompt=prompt, adapter_id="wide", max_new_tokens=N).token_ids


def vars_of(settings) -> dict:
    import dataclasses

    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


def test_output_shards_follow_the_requested_size(sharded):
    root, _, client = sharded
    result = client.merge("wide", "small-shards", max_shard_bytes=4 << 20).result(timeout=300)
    out = root / "merged" / "default" / "small-shards"
    checkpoint = read_base_checkpoint(out)
    assert len(checkpoint.shards) > len(read_base_checkpoint(root / "base").shards)
    assert checkpoint.largest_shard_bytes <= 4 << 20
    assert sorted(result.files) == sorted(p.name for p in out.iterdir())
    got, oracle = tensors(out), tensors(peft_merged(root))
    assert got.keys() == oracle.keys() and all(torch.equal(got[k], oracle[k]) for k in got)


def test_a_cancelled_merge_leaves_nothing_and_delete_forgets_an_ended_one(sharded):
    root, server, client = sharded
    merges = server.engine.merges
    gate = threading.Event()
    merges._executor.submit(gate.wait, 60)  # the merge thread is busy: the next merge waits its turn
    handle = client.merge("wide", "cancelled")
    with pytest.raises(lc.FailedPrecondition) as e:
        handle.delete()  # still queued: it must be cancelled first
    assert e.value.reason == "OPERATION_RUNNING"
    handle.cancel()
    gate.set()
    with pytest.raises(lc.Cancelled) as e:
        handle.result(timeout=120)
    assert e.value.reason == "CANCELLED"
    assert not (root / "merged" / "default" / "cancelled").exists()
    assert not [p for p in (root / "merged" / "default").iterdir() if p.name.startswith(".loramux-merge")]
    handle.cancel()  # ended: cancelling again changes nothing
    handle.delete()
    with pytest.raises(lc.NotFound) as e:
        handle.progress()
    assert e.value.reason == "OPERATION_NOT_FOUND"


def test_a_base_without_safetensors_weights_cannot_be_merged(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MergeUnsupported) as e:
        read_base_checkpoint(tmp_path)
    assert e.value.reason == "MERGE_UNSUPPORTED"


def test_verify_compares_the_merged_logits_with_base_plus_adapter(sharded):
    from loramux.server.merging.merge import verify_merged

    root, server, client = sharded
    result = client.merge("wide", "verified", verify=True).result(timeout=300)
    assert result.max_logit_difference is not None and result.max_logit_difference < 1e-4
    manifest = json.loads((root / "merged" / "default" / "verified" / "loramux_merge.json").read_text())
    assert manifest["max_logit_difference"] == result.max_logit_difference and manifest["verified"] is True
    # The check can fail: the base itself, taken for the merged model, is far from base + adapter.
    vocab = server.engine.base.vocab_size
    assert verify_merged(root / "base", root / "adapters" / "wide", root / "base", vocab) > 100 * result.max_logit_difference


@pytest.fixture(scope="module")
def small(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("small-merges")
    server = BackgroundServer(assets.settings(merge_root=root))
    client = lc.Client(server.target, timeout=120)
    for name in ("qv-r4", "mlp-r2", "all-r16"):
        client.load_adapter(name, source=name)
    yield root, server, client
    client.close()
    server.stop()


def peft_with(assets, names):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(assets.base), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(assets.adapters / names[0]), adapter_name="a0")
    for i, name in enumerate(names[1:], 1):
        model.load_adapter(str(assets.adapters / name), adapter_name=f"a{i}")
    return model


def test_a_combination_registered_as_an_adapter_serves_as_peft_combines(assets, small):
    root, server, client = small
    result = client.combine([("qv-r4", 0.8), ("mlp-r2", -0.5)], "mix-cat", method="cat", adapter_only=True,
                            register_as="mix").result(timeout=120)
    assert sorted(result.files) == ["adapter_config.json", "adapter_model.safetensors", "loramux_merge.json"]
    info = client.get_adapter("mix")
    assert info.source == "merged://mix-cat" and info.rank == 6
    model = peft_with(assets, ["qv-r4", "mlp-r2"])
    model.add_weighted_adapter(["a0", "a1"], [0.8, -0.5], "mix", combination_type="cat")
    model.set_adapter("mix")
    for prompt in PROMPTS[:2]:
        ids = assets.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False)[0, ids.shape[1]:]
        assert client.generate(prompt=prompt, adapter_id="mix", max_new_tokens=N).token_ids == want.tolist()
    manifest = json.loads((root / "default" / "mix-cat" / "loramux_merge.json").read_text())
    assert manifest["method"] == "cat" and [a["weight"] for a in manifest["adapters"]] == [0.8, -0.5]
    assert manifest["output"] == "adapter"


def test_a_combination_merges_into_the_base_as_peft_merges_it(assets, small):
    root, _, client = small
    client.combine([("qv-r4", 0.6), ("qv-r4", 0.3)], "mix-linear", method="linear").result(timeout=120)
    model = peft_with(assets, ["qv-r4", "qv-r4"])
    model.add_weighted_adapter(["a0", "a1"], [0.6, 0.3], "mix", combination_type="linear")
    model.set_adapter("mix")
    want = {k: v for k, v in model.merge_and_unload().state_dict().items()}
    got = tensors(root / "default" / "mix-linear")
    assert got.keys() <= want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_merge_requests_are_checked_before_an_operation_exists(small):
    _, _, client = small
    for call, cls, reason in [
        (lambda: client.merge("qv-r4", "x", register_as="y"), lc.InvalidArgument, "MERGE_INPUT_INVALID"),
        (lambda: client.merge("qv-r4", "x", adapter_only=True, verify=True), lc.InvalidArgument, "MERGE_INPUT_INVALID"),
        (lambda: client.combine([("qv-r4", 1.0)], "x", method="blend"), lc.InvalidArgument, "COMBINATION_INVALID"),
        (lambda: client.combine([("qv-r4", 1.0), ("all-r16", 1.0)], "x", method="ties", density=0.5),
         lc.InvalidArgument, "COMBINATION_INVALID"),  # ties needs one rank
        (lambda: client.combine([("all-r16", 1.0), ("qv-r4", 1.0)], "x", method="cat", adapter_only=True, register_as="big"),
         lc.InvalidArgument, "ADAPTER_RANK_TOO_LARGE"),  # rank 20 > --max-lora-rank 16
        (lambda: client.combine([("qv-r4", 1.0), ("nope", 1.0)], "x"), lc.NotFound, "ADAPTER_NOT_FOUND"),
        (lambda: client.merge("qv-r4", "x", adapter_only=True, register_as="mlp-r2"), lc.AlreadyExists,
         "ADAPTER_ALREADY_EXISTS"),
        (lambda: client.merge("qv-r4", "x", adapter_only=True, register_as=client.server_info().model_id),
         lc.InvalidArgument, "ADAPTER_ID_RESERVED"),  # the served model's name names the base over HTTP
    ]:
        with pytest.raises(cls) as e:
            call().result(timeout=120)
        assert e.value.reason == reason


def test_a_bfloat16_base_merges_as_peft_merges_it(assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loramux.server.adapters.checkpoint import read_checkpoint
    from loramux.server.model.base_model import load_base_model
    from loramux.server.merging.merge import merge_to_checkpoint

    AutoModelForCausalLM.from_pretrained(str(assets.base), dtype=torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    assets.tokenizer.save_pretrained(str(tmp_path / "bf16"))
    settings = assets.settings(model=str(tmp_path / "bf16"), model_name=str(assets.base))
    view = load_base_model(settings).view(settings)
    _, weights = read_checkpoint(assets.adapters / "all-r16", view, dtype=torch.float32, root=assets.adapters / "all-r16")
    merge_to_checkpoint(read_base_checkpoint(tmp_path / "bf16"), weights, tmp_path / "out", {}, lambda p: None)
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype=torch.bfloat16)
    want = PeftModel.from_pretrained(base, str(assets.adapters / "all-r16")).merge_and_unload().state_dict()
    got = tensors(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    # Within rounding: at most one bfloat16 step apart, and almost everywhere equal.
    for name, tensor in got.items():
        diff = (tensor.float() - want[name].float()).abs()
        assert (diff <= tensor.float().abs().clamp(min=1e-30) * 2**-7).all(), name
    equal = sum(int((got[k] == want[k]).sum()) for k in got) / sum(t.numel() for t in got.values())
    print(f"\nbfloat16 merge: {equal:.6f} of values equal to peft's")
    assert equal > 0.99
