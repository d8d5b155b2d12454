"""Microbenchmarks: one decode step with and without adapters, promotion from host memory,
reading from disk with few and many adapters registered, gRPC's cost on a 1-token call, and
what fusing the shrink of modules that share an input would save."""

from __future__ import annotations

import random
import time

import torch

from loramux.bench.config import BenchConfig
from loramux.bench.metrics import median_ms
from loramux.server.adapters.cache import TieredAdapterCache, Tier
from loramux.server.lora.weights import AdapterWeights, ModuleLora
from loramux.server.model.base_model import BaseModel
from loramux.server.engine.engine import Engine
from loramux.server.engine.kv_cache import new_dynamic_cache
from loramux.server.engine.inputs import GenerateInput


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_weights(base: BaseModel, cfg: BenchConfig, seed: int) -> AdapterWeights:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, layer in base.bank.layers.items():
        if name.rsplit(".", 1)[-1] in cfg.target_modules:
            a = torch.randn(cfg.rank, layer.in_features, generator=gen) * 0.02
            b = torch.randn(layer.out_features, cfg.rank, generator=gen) * 0.02
            modules[name] = ModuleLora(a=a, b=b, scale=2.0)
    return AdapterWeights(modules=modules)


@torch.inference_mode()
def decode_step(base: BaseModel, cfg: BenchConfig) -> dict:
    """A decode step of `step_rows` rows over a `step_kv`-token cache, every row with its own
    adapter, against the same step with no adapter. Needs a bank of >= step_rows slots."""
    rows = cfg.step_rows
    uids = [100 + row for row in range(rows)]
    for uid in uids:
        base.bank.place(uid, random_weights(base, cfg, uid))
    rng = random.Random(cfg.seed)
    device = base.device
    ids = torch.tensor([[rng.randrange(3, base.vocab_size) for _ in range(cfg.step_kv)] for _ in range(rows)], device=device)
    cache = new_dynamic_cache(base.model.config)
    base.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    saved = [(layer.keys, layer.values) for layer in cache.layers]
    token = ids[:, -1:]
    mask = torch.ones(rows, cfg.step_kv + 1, dtype=torch.long, device=device)
    positions = torch.full((rows, 1), cfg.step_kv, device=device)
    routed = base.bank.plan(uids, base.device)
    times: dict[str, list[float]] = {"base": [], "lora": [], "lora_regather": []}
    # lora: the rows stay the same, as between joins and leaves. lora_regather: a new plan
    # every step (rows join or leave at every step), so every layer builds its view again.
    # Each is interleaved with the base step on its own: interleaved with each other, the
    # stable plan would be rebuilt at every step too (a layer keeps the view of one plan).
    for kind in ("lora", "lora_regather"):
        for rep in range(cfg.step_reps + 2):
            plan = routed if kind == "lora" else base.bank.plan(uids, base.device)
            for name, index in (("base", None), (kind, plan)):
                for layer, (k, v) in zip(cache.layers, saved):
                    layer.keys, layer.values = k, v
                base.bank.route(index)
                _sync(device)
                t0 = time.perf_counter()
                base.model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                           logits_to_keep=1)
                _sync(device)
                if rep >= 2:  # two warm-up rounds
                    times[name].append(time.perf_counter() - t0)
    base.bank.route(None)
    for uid in uids:
        base.bank.drop(uid)
    b, lora, regather = median_ms(times["base"]), median_ms(times["lora"]), median_ms(times["lora_regather"])
    return {"rows": rows, "distinct_adapters": rows, "base_step_ms": b, "lora_step_ms": lora, "ratio": round(lora / b, 3),
            "lora_regather_step_ms": regather, "regather_ratio": round(regather / b, 3)}


def promotion(base: BaseModel, cfg: BenchConfig, step_ms: float) -> dict:
    """Host memory -> slot with every slot full, so each promotion also evicts one adapter back to host."""
    slots = base.bank.num_slots
    cache = TieredAdapterCache(base.bank, 1 << 40, reload=lambda uid: None, host_pin_memory=base.device.type == "cuda")
    for uid in range(slots + 8):
        cache.add(uid, random_weights(base, cfg, 200 + uid))
    for uid in range(slots):
        cache.acquire(uid)
        cache.release(uid)
    times = []
    for uid in range(slots, slots + 8):
        assert cache.tier(uid) is Tier.HOST
        _sync(base.device)
        t0 = time.perf_counter()
        cache.acquire(uid)
        _sync(base.device)
        times.append(time.perf_counter() - t0)
        cache.release(uid)
    for uid in range(slots + 8):
        cache.remove(uid)
    ms = median_ms(times)
    return {"promote_ms": ms, "decode_step_ms": step_ms, "ratio_to_step": round(ms / step_ms, 3)}


def disk_reads(engine: Engine, cfg: BenchConfig, sources: list[str]) -> dict:
    """Register and read back from disk with few, then many, then few adapters registered again
    (unloading the extra ones), so drift in the process over the run does not pass for scaling.
    The engine must have no host tier (host_cache_mib=0), so registered adapters stay on disk."""
    registry, cache = engine.registry, engine.cache
    samples = 10
    names = iter(f"n{i:05d}" for i in range(10**6))
    live: list[str] = []

    def register() -> float:
        name = next(names)
        t0 = time.perf_counter()
        registry.load("scale", name, sources[len(live) % len(sources)])
        live.append(name)
        return time.perf_counter() - t0

    def read(name: str) -> float:
        uid = registry.get("scale", name).uid
        assert cache.tier(uid) is Tier.DISK
        t0 = time.perf_counter()
        cache.ensure_in_memory(uid)
        return time.perf_counter() - t0

    phases = []
    for count in (cfg.registered_small, cfg.registered_large, cfg.registered_small):
        while len(live) > count - samples:
            registry.unload("scale", live.pop())
        while len(live) < count - samples:
            register()
        reg = [register() for _ in range(samples)]
        reads = [read(name) for name in live[-samples:]]
        phases.append({"registered": count, "register_ms": median_ms(reg), "read_ms": median_ms(reads)})
    small = (phases[0]["read_ms"] + phases[2]["read_ms"]) / 2
    small_reg = (phases[0]["register_ms"] + phases[2]["register_ms"]) / 2
    return {
        "phases": phases,
        "registered_large": cfg.registered_large,
        "read_ratio": round(phases[1]["read_ms"] / small, 3),
        "register_ratio": round(phases[1]["register_ms"] / small_reg, 3),
    }


def one_token_rpc(engine: Engine, target: str, cfg: BenchConfig, prompt: list[int]) -> dict:
    """p50 of a 1-token Generate through gRPC against the same call on the engine in process."""
    import loramux.client as lc

    rpc, local = [], []
    with lc.Client(target, timeout=60) as client:
        for i in range(cfg.rpc_calls + 3):
            t0 = time.perf_counter()
            client.generate(prompt_token_ids=prompt, max_new_tokens=1)
            t1 = time.perf_counter()
            engine.generate("bench", GenerateInput(prompt_token_ids=prompt, max_new_tokens=1), 60)
            t2 = time.perf_counter()
            if i >= 3:
                rpc.append(t1 - t0)
                local.append(t2 - t1)
    r, p = median_ms(rpc), median_ms(local)
    return {"grpc_p50_ms": r, "in_process_p50_ms": p, "ratio": round(r / p, 3)}


@torch.inference_mode()
def shrink_fusion(base: BaseModel, cfg: BenchConfig, base_step_ms: float) -> dict:
    """What fusing the shrink of modules that share an input would save in a decode step: the
    masked shrink `(x @ A_cat) * mask` run once per module (q, k, v; gate, up) against once
    per input (q|k|v concatenated; gate|up), with `step_rows` distinct adapters of rank
    `rank` per module and `step_rows` rows, at the model's own widths. Median per decoder
    layer, interleaved, and the saving as a share of the base decode step."""
    hidden = base.model.config.hidden_size
    device, dtype = base.device, base.dtype
    columns = cfg.step_rows * cfg.rank
    groups = {"q|k|v": 3, "gate|up": 2}  # modules sharing one input, per decoder layer
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    x = torch.randn(cfg.step_rows, 1, hidden, generator=gen).to(device, dtype)
    mask = (torch.randint(0, 2, (cfg.step_rows, 1, columns), generator=gen)).to(device, dtype)
    separate = {g: [torch.randn(hidden, columns, generator=gen).to(device, dtype) for _ in range(n)] for g, n in groups.items()}
    fused = {g: torch.cat(parts, 1) for g, parts in separate.items()}
    fused_mask = {g: mask.repeat(1, 1, n) for g, n in groups.items()}

    def run_separate():
        return [(x @ a) * mask for parts in separate.values() for a in parts]

    def run_fused():
        return [(x @ fused[g]) * fused_mask[g] for g in groups]

    times: dict[str, list[float]] = {"separate": [], "fused": []}
    for rep in range(10 * cfg.step_reps + 5):
        for kind, fn in (("separate", run_separate), ("fused", run_fused)) if rep % 2 == 0 else (("fused", run_fused), ("separate", run_separate)):
            _sync(device)
            started = time.perf_counter()
            fn()
            _sync(device)
            if rep >= 5:
                times[kind].append(time.perf_counter() - started)
    separate_ms, fused_ms = median_ms(times["separate"]), median_ms(times["fused"])
    layers = base.model.config.num_hidden_layers
    return {
        "separate_ms_per_layer": separate_ms,
        "fused_ms_per_layer": fused_ms,
        "saved_share_of_base_step": round(layers * (separate_ms - fused_ms) / base_step_ms, 4),
    }
