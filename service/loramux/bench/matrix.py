"""python -m loramux.bench.matrix [--quick] [--out DIR]: what users get, over a matrix.

Every loramux server here runs with the server's **default flags** (only the model, the
adapter root, the API keys file and a free port are given), as a user who types `loramux
serve` gets; the clients send an admin key. For each
cell of model size x adapter shape x sampling, side by side in one run, on the same requests:

- loramux, mixed adapters, through gRPC (16 streaming clients, closed loop, in a separate
  process: users' clients do not share the server's interpreter);
- loramux, base model only, through gRPC;
- loramux with `--scheduling static` (continuous batching off), mixed adapters;
- peft `generate(adapter_names=...)` on static batches of 16;
- plain transformers `generate` on static batches of 16, no adapters;
- naive peft: one request at a time.

Every system generates exactly the requested tokens (EOS ignored). Per model it also times a
decode step of 16 rows with 16 distinct rank-16 adapters on all seven projections against the
base step, and per adapter shape the accelerator bytes each resident adapter takes against its
true size. The report leads with the worst cell.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import json
import logging
import platform
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from loramux.bench import runners
from loramux.bench.config import BenchConfig
from loramux.bench.metrics import summarize
from loramux.bench.workload import Req
from loramux.server.cpu_threads import in_own_thread, limit_to_one_thread
from loramux.server.tenancy.keys import append_key

log = logging.getLogger("loramux.bench.matrix")
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {  # name -> [(rank, target modules)] cycled over the adapters
    "r16-qkvo": [(16, ALL[:4])],
    "r8-all": [(8, ALL)],
    "r8+r64-all": [(8, ALL), (64, ALL)],
}
SAMPLINGS = {"greedy": None, "sampled": {"temperature": 0.8, "top_p": 0.9, "top_k": 50}}
SYSTEMS = ("loramux_mixed", "loramux_base_only", "loramux_static", "peft_adapter_names", "transformers_plain", "peft_naive")
TARGETS = {  # name -> (how it is computed, target, "min" or "max")
    "mixed / peft adapter_names": (("loramux_mixed", "peft_adapter_names"), 1.2, "min"),
    "mixed / loramux base-only": (("loramux_mixed", "loramux_base_only"), 0.85, "min"),
    "loramux base-only / transformers plain": (("loramux_base_only", "transformers_plain"), 0.95, "min"),
    "p99 TTFT mixed / base-only": (None, 1.5, "max"),
}


@dataclasses.dataclass(frozen=True)
class MatrixConfig:
    models: tuple[tuple[int, int, int, int, int], ...] = ((512, 6, 1408, 8, 4), (1024, 8, 2816, 16, 8), (2048, 4, 5632, 16, 8))
    """(hidden, layers, intermediate, heads, kv heads) of each random Llama."""
    shapes: tuple[str, ...] = tuple(SHAPES)
    samplings: tuple[str, ...] = tuple(SAMPLINGS)
    adapters: int = 32
    requests: int = 48
    concurrency: int = 16
    prompt_tokens: tuple[int, int] = (8, 24)
    output_tokens: int = 24
    zipf_s: float = 1.1
    vocab: int = 512
    step_reps: int = 10
    seed: int = 0
    checkpoint_dtype: str = "float32"
    """The dtype the base checkpoint is saved in; `--dtype auto` serves bfloat16 or float16 ones
    in that dtype on CUDA (users' models are mostly bfloat16), float32 on the CPU."""
    server_flags: tuple[tuple[str, object], ...] = ()
    """Settings every loramux server of the run takes besides its defaults (`--set`), e.g.
    (("lora_kernel", "triton"),); empty: the server's defaults, as users get them."""

    @classmethod
    def quick(cls) -> MatrixConfig:
        return cls(models=((128, 2, 352, 4, 2),), shapes=("r16-qkvo", "r8+r64-all"), adapters=6, requests=12,
                   concurrency=4, output_tokens=6, step_reps=3)


def _requests(cfg: MatrixConfig, names: list[str], vocab: int) -> list[Req]:
    rng = random.Random(cfg.seed)
    weights = [1 / (k + 1) ** cfg.zipf_s for k in range(len(names))]
    return [
        Req(rng.choices(names, weights)[0], [rng.randrange(3, vocab) for _ in range(rng.randint(*cfg.prompt_tokens))],
            cfg.output_tokens)
        for _ in range(cfg.requests)
    ]


def _build_model(cfg: MatrixConfig, dims, root: Path) -> Path:
    from loramux.demo import corpus
    from loramux.demo.assets import build_model, build_tokenizer

    hidden, layers, inter, heads, kv = dims
    tokenizer = build_tokenizer(root / "tokenizer", corpus.plain(300), vocab_size=cfg.vocab, max_length=4096)
    build_model(root / "model", tokenizer, hidden=hidden, layers=layers, heads=heads, kv_heads=kv, intermediate=inter,
                max_positions=4096, seed=cfg.seed, init_std=0.02)
    if cfg.checkpoint_dtype != "float32":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(root / "model"), dtype=getattr(torch, cfg.checkpoint_dtype))
        model.save_pretrained(str(root / "model"))
    return root / "model"


def _build_adapters(cfg: MatrixConfig, model_dir: Path, shape: str, out: Path) -> list[str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    names = [f"a{i:02d}" for i in range(cfg.adapters)]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    kinds = SHAPES[shape]
    for kind, (rank, targets) in enumerate(kinds):
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0))
        for name in names[kind :: len(kinds)]:
            with torch.no_grad():
                for pname, p in peft_model.named_parameters():
                    if "lora_A" in pname or "lora_B" in pname:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            peft_model.save_pretrained(str(out / name))
    return names


def _server_settings(cfg: MatrixConfig, model_dir: Path, adapters_dir: Path, keys_file: Path, **overrides):
    from loramux.server.settings import Settings

    # Defaults otherwise, API keys included (the clients send an admin key of the default tenant).
    return Settings(model=str(model_dir), adapter_roots=(adapters_dir,), port=0, auth_keys_file=keys_file,
                    **{**dict(cfg.server_flags), **overrides})


def parse_flags(pairs: list[str]) -> tuple[tuple[str, object], ...]:
    """`name=value` pairs for Settings fields, each value read as its field's type."""
    from loramux.server.settings import Settings

    fields = {f.name: str(f.type) for f in dataclasses.fields(Settings)}
    out = []
    for pair in pairs:
        name, _, value = pair.partition("=")
        kind = fields.get(name)
        if kind is None:
            raise SystemExit(f"--set {pair}: Settings has no field {name!r}")
        if kind == "bool":
            out.append((name, value.lower() in ("1", "true", "yes", "on")))
        elif kind.startswith("int"):
            out.append((name, int(value)))
        elif kind.startswith("float"):
            out.append((name, float(value)))
        else:
            out.append((name, value))
    return tuple(out)


def _resident_bytes(server, names: list[str]) -> dict:
    """Warm every adapter in turn: the accelerator bytes it adds against its true size. A warm-up
    that evicted another adapter to make room is not counted (its delta is not one adapter's)."""
    engine, bank = server.engine, server.engine.base.bank
    worst, measured = 0.0, 0
    for name in names:
        record = engine.registry.get("default", name)
        table, before = bank.slot_table(), bank.resident_bytes()
        cuda_before = torch.cuda.memory_allocated() if bank_on_cuda(bank) else None
        engine.load_adapter("default", name, record.source, warm=True)
        kept = {uid for uid in table if uid is not None} <= set(bank.slot_table())
        if not kept or record.uid in table:  # something was evicted, or it was resident already
            continue
        added = (torch.cuda.memory_allocated() - cuda_before) if cuda_before is not None else bank.resident_bytes() - before
        worst = max(worst, abs(added - record.spec.size_bytes) / record.spec.size_bytes)
        measured += 1
    return {"max_relative_excess": round(worst, 6), "adapters_measured": measured, "budget_bytes": engine.adapter_memory_bytes}


def bank_on_cuda(bank) -> bool:
    return next(iter(bank.layers.values())).base_layer.weight.is_cuda


def run_cell(
    cfg: MatrixConfig, model_dir: Path, adapters_dir: Path, names: list[str], base, sampling: str, load_generator,
    keys_file: Path, api_key: str,
) -> dict:
    """Every system on the same requests for one (model, adapters, sampling) cell."""
    import loramux.client as lc
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loramux.server.app import BackgroundServer

    params = SAMPLINGS[sampling]
    reqs = _requests(cfg, names, base.vocab_size)
    warm = reqs[: cfg.concurrency]
    out: dict[str, dict] = {}
    def clients(target: str, requests: list[Req], **kwargs) -> dict:
        # The load generator runs in its own process, as users' clients run elsewhere: in this
        # one its threads would take the GIL from the server's event loop and engine thread.
        # It still shares this machine's cores; its CPU time is reported with the run.
        records, cpu_s = load_generator.submit(runners.grpc_load, target, requests, cfg.concurrency, api_key=api_key,
                                               **kwargs).result()
        return {**summarize(records), "load_generator_cpu_s": cpu_s}

    for system, overrides in (("loramux_mixed", {}), ("loramux_static", {"scheduling": "static"})):
        server = BackgroundServer(_server_settings(cfg, model_dir, adapters_dir, keys_file, **overrides), base=base)
        try:
            with lc.Client(server.target, timeout=600, api_key=api_key) as client:
                for name in names:
                    client.load_adapter(name, source=name)
            clients(server.target, warm, sampling=params)
            before = server.engine.stats()
            out[system] = clients(server.target, reqs, sampling=params)
            out[system].update(_engine_work(before, server.engine.stats()))
            if system == "loramux_mixed":
                before = server.engine.stats()
                out["loramux_base_only"] = clients(server.target, reqs, use_adapter=False, sampling=params)
                out["loramux_base_only"].update(_engine_work(before, server.engine.stats()))
        finally:
            server.stop()
    plain = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=base.dtype).to(base.device).eval()
    pad = base.pad_token_id
    # Each in-process system runs on a thread of its own that ends with it, as loramux's engine
    # thread does: no system inherits another's idle OpenMP workers (server/cpu_threads.py).
    in_own_thread(runners.peft_mixed_batches, plain, warm, cfg.concurrency, pad, params, False)
    out["transformers_plain"] = summarize(in_own_thread(runners.peft_mixed_batches, plain, reqs, cfg.concurrency, pad, params, False))
    peft_model = PeftModel.from_pretrained(plain, str(adapters_dir / names[0]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(adapters_dir / name), adapter_name=name)
    in_own_thread(runners.peft_mixed_batches, peft_model, warm, cfg.concurrency, pad, params)
    out["peft_adapter_names"] = summarize(in_own_thread(runners.peft_mixed_batches, peft_model, reqs, cfg.concurrency, pad, params))
    out["peft_naive"] = summarize(in_own_thread(runners.peft_naive, peft_model, reqs, cfg.concurrency, pad, params))
    expected = sum(r.output_tokens for r in reqs)
    for system, summary in out.items():
        if summary["output_tokens"] != expected:
            raise AssertionError(f"{system} generated {summary['output_tokens']} tokens, not {expected}")
    return out


def _engine_work(before, after) -> dict:
    """Passes a run took and the adapter bytes its decode steps read."""
    steps = after.steps - before.steps
    return {"decode_steps": steps, "prefills": after.prefills - before.prefills,
            "adapter_bytes_per_step": round((after.adapter_bytes_read - before.adapter_bytes_read) / max(steps, 1))}


def base_bytes_per_step(model) -> int:
    """Weights a decode step reads from the base model: every parameter but the input embedding
    table (a step looks up one row of it), unless the output head shares it."""
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embedding
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding or tied)


def bandwidth_floor(systems: dict[str, dict], base_bytes: int) -> float:
    """The mixed / base-only ratio a decode step bound by memory traffic would reach: base
    weights against base plus the distinct adapters' weights the mixed run read per step."""
    return round(base_bytes / (base_bytes + systems["loramux_mixed"]["adapter_bytes_per_step"]), 3)


def ratios(systems: dict[str, dict]) -> dict[str, dict]:
    """Each target's value in one cell, whether it is met, and its margin (>= 1 when met)."""
    out = {}
    for name, (pair, target, kind) in TARGETS.items():
        if pair is None:
            value = systems["loramux_mixed"]["ttft_p99_ms"] / systems["loramux_base_only"]["ttft_p99_ms"]
        else:
            value = systems[pair[0]]["output_tokens_per_s"] / systems[pair[1]]["output_tokens_per_s"]
        margin = value / target if kind == "min" else target / value
        out[name] = {"value": round(value, 3), "target": target, "kind": kind, "met": margin >= 1, "margin": round(margin, 3)}
    return out


def run(cfg: MatrixConfig, work: Path) -> dict:
    from loramux.bench.micro import decode_step
    from loramux.server.model.base_model import load_base_model

    started = time.monotonic()
    limit_to_one_thread()  # set-up on this thread stays single-threaded; the systems run on their own threads
    cells, steps, memory = [], [], []
    load_generator = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    keys_file = work / "keys.yaml"
    api_key = append_key(keys_file, "default", "admin", "bench")
    for m, dims in enumerate(cfg.models):
        model_dir = _build_model(cfg, dims, work / f"model{m}")
        base = load_base_model(_server_settings(cfg, model_dir, work, keys_file))
        step_base = load_base_model(_server_settings(cfg, model_dir, work, keys_file, adapter_slots=max(16, cfg.concurrency)))
        step = in_own_thread(decode_step, step_base, BenchConfig(rank=16, target_modules=ALL, step_rows=16, step_kv=64, step_reps=cfg.step_reps))
        steps.append({"hidden": dims[0], "layers": dims[1], **step})
        del step_base
        for shape in cfg.shapes:
            adapters_dir = work / f"model{m}-{shape}"
            names = _build_adapters(cfg, model_dir, shape, adapters_dir)
            from loramux.server.app import BackgroundServer

            with BackgroundServer(_server_settings(cfg, model_dir, adapters_dir, keys_file), base=base) as server:
                for name in names:
                    server.engine.load_adapter("default", name, name)
                memory.append({"hidden": dims[0], "shape": shape, **_resident_bytes(server, names)})
            for sampling in cfg.samplings:
                log.info("cell: hidden %d, %s, %s", dims[0], shape, sampling)
                systems = run_cell(cfg, model_dir, adapters_dir, names, base, sampling, load_generator, keys_file, api_key)
                cells.append({"hidden": dims[0], "layers": dims[1], "shape": shape, "sampling": sampling,
                              "systems": systems, "ratios": ratios(systems),
                              "mixed_base_bandwidth_floor": bandwidth_floor(systems, base_bytes_per_step(base.model))})
        del base
    load_generator.shutdown()
    cells.sort(key=lambda c: min(r["margin"] for r in c["ratios"].values()))  # the worst cell first
    return {
        "config": dataclasses.asdict(cfg),
        "server_flags": "defaults (loramux serve --model M --adapter-root R --auth-keys-file K --port 0)"
                        + "".join(f" --{k.replace('_', '-')} {v}" for k, v in cfg.server_flags),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": in_own_thread(torch.get_num_threads)},
        "cells": cells,
        "decode_step": steps,
        "resident_bytes": memory,
        "wall_s": round(time.monotonic() - started, 1),
    }


def markdown(results: dict) -> str:
    lines = [
        f"Server flags: {results['server_flags']}. Cells sorted worst first (by their smallest margin to a target).",
        "",
        "| model | adapters | sampling | " + " | ".join(f"{n} (target {t[1]})" for n, t in TARGETS.items()) + " | mixed tok/s |",
        "|---|---|---|" + "---|" * (len(TARGETS) + 1),
    ]
    for c in results["cells"]:
        marks = [f"{r['value']}{'' if r['met'] else ' (miss)'}" for r in c["ratios"].values()]
        marks[1] += f" [floor {c['mixed_base_bandwidth_floor']}]"
        lines.append(f"| h{c['hidden']}x{c['layers']} | {c['shape']} | {c['sampling']} | " + " | ".join(marks)
                     + f" | {c['systems']['loramux_mixed']['output_tokens_per_s']} |")
    lines += ["", "[floor]: the mixed / base-only ratio a decode step bound by memory traffic would reach, from the base "
              "weights and the distinct adapters' weights the mixed run's steps read (engine counters)."]
    lines += ["", "| model | decode step: 16 rows x 16 distinct r16 adapters, all seven projections / base step (target 1.15 at h1024) |",
              "|---|---|"]
    lines += [f"| h{s['hidden']}x{s['layers']} | {s['ratio']} (base {s['base_step_ms']} ms) |" for s in results["decode_step"]]
    lines += ["", "| model | adapters | bytes per resident adapter vs its true size (largest excess) |", "|---|---|---|"]
    lines += [f"| h{r['hidden']} | {r['shape']} | {r['max_relative_excess']:.2%} |" for r in results["resident_bytes"]]
    lines += ["", f"Wall time {results['wall_s']} s on {results['machine']['platform']}, torch {results['machine']['torch']}, "
              f"{results['machine']['threads']} threads."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loramux.bench.matrix", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny model, two shapes (the suite runs this)")
    parser.add_argument("--out", default="bench-results", help="directory for matrix.json and matrix.md")
    parser.add_argument("--models", help="hidden sizes to keep, comma-separated (e.g. 512,1024)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a server setting besides the defaults (e.g. lora_kernel=triton), repeatable")
    parser.add_argument("--checkpoint-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the dtype the base checkpoints are saved in (the server's --dtype auto follows it on CUDA)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("loramux.access").setLevel(logging.WARNING)
    cfg = MatrixConfig.quick() if args.quick else MatrixConfig()
    cfg = dataclasses.replace(cfg, checkpoint_dtype=args.checkpoint_dtype, server_flags=parse_flags(args.set))
    if args.models:
        keep = {int(h) for h in args.models.split(",")}
        cfg = dataclasses.replace(cfg, models=tuple(m for m in cfg.models if m[0] in keep))
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        results = run(cfg, Path(tmp))
    results["command"] = " ".join(["python -m loramux.bench.matrix", *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "matrix.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
