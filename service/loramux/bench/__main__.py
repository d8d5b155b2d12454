"""python -m loramux.bench [--quick] [--out DIR]: every system on the same workload, in one process."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from loramux.bench import assets, micro, report, runners, tracing
from loramux.bench.config import BenchConfig
from loramux.bench.metrics import summarize, summarize_rounds
from loramux.bench.workload import adapter_names, make_requests, poisson_arrivals
from loramux.server.cpu_threads import in_own_thread, limit_to_one_thread

log = logging.getLogger("loramux.bench")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loramux.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small model and workload (under a minute)")
    parser.add_argument("--out", default="bench-results", help="directory for results.json, .md and .png")
    parser.add_argument("--work-dir", help="where the model and adapters are built (default: a temporary directory)")
    parser.add_argument("--device", help="cpu (default) or cuda")
    parser.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    for field in dataclasses.fields(BenchConfig):
        if field.type in ("int", "float"):
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=int if field.type == "int" else float)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("loramux.access").setLevel(logging.WARNING)  # one line per RPC: too many here
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig) if getattr(args, f.name, None) is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    with tempfile.TemporaryDirectory() as tmp:
        results = run(cfg, Path(args.work_dir or tmp))
    results["command"] = " ".join(["python -m loramux.bench", *(argv if argv is not None else sys.argv[1:])])
    report.write(results, Path(args.out))
    print(report.markdown(results))
    return 0


def run(cfg: BenchConfig, work: Path) -> dict:
    from transformers import AutoModelForCausalLM
    from peft import PeftModel

    from loramux.server.app import BackgroundServer
    from loramux.server.model.base_model import load_base_model
    from loramux.server.engine.engine import Engine
    from loramux.server.settings import Settings
    from loramux.server.telemetry.providers import build_telemetry
    import loramux.client as lc

    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    # Set-up on this thread stays single-threaded; each in-process system runs on a thread of
    # its own that ends with it, as the engine's does (server/cpu_threads.py).
    limit_to_one_thread()
    log.info("building a random model (hidden %d, %d layers) and %d adapters", cfg.hidden, cfg.layers, cfg.adapters)
    model_dir, adapters_dir = assets.build(cfg, work)
    names = adapter_names(cfg)
    sources = [str(adapters_dir / n) for n in names]
    settings = Settings(
        model=str(model_dir), dtype=cfg.dtype, device=cfg.device, port=0, adapter_roots=(adapters_dir,),
        adapter_slots=cfg.slots, max_lora_rank=cfg.rank, target_modules=cfg.target_modules,
        max_batch_size=cfg.concurrency, max_queue=4 * cfg.requests, auth="none",
    )
    base = load_base_model(settings)
    vocab = (3, base.vocab_size)
    reqs = make_requests(cfg, cfg.requests, vocab, cfg.seed)
    warm = make_requests(cfg, cfg.concurrency, vocab, cfg.seed + 7)
    systems: dict[str, dict] = {}

    def load_all(engine: Engine) -> None:
        for name, source in zip(names, sources):
            engine.load_adapter("bench", name, source)

    log.info("(a) and (b): the engine in process")
    engine = Engine(settings, base).start()
    load_all(engine)
    runners.engine_closed_loop(engine, warm, cfg.concurrency, True)
    runs: dict[bool, list] = {True: [], False: []}
    passes: dict[bool, list[int]] = {True: [0, 0], False: [0, 0]}  # decode steps, prefill passes
    for round_ in range(cfg.rounds):
        for use_adapter in (False, True) if round_ % 2 == 0 else (True, False):
            before = engine.stats()
            runs[use_adapter].append(runners.engine_closed_loop(engine, reqs, cfg.concurrency, use_adapter))
            after = engine.stats()
            passes[use_adapter][0] += after.steps - before.steps
            passes[use_adapter][1] += after.prefills - before.prefills
    for key, use_adapter in (("a_loramux_mixed", True), ("b_loramux_base_only", False)):
        summary = summarize_rounds(runs[use_adapter])
        steps, prefills = passes[use_adapter]
        summary["decode_steps_per_round"] = steps / cfg.rounds
        summary["prefills_per_round"] = prefills / cfg.rounds
        # Every request's first token comes from its prefill; the rest from decode steps.
        summary["rows_per_decode_step"] = round((summary["output_tokens"] - cfg.requests) * cfg.rounds / steps, 2)
        systems[key] = summary

    rate = cfg.poisson_load * systems["a_loramux_mixed"]["requests_per_s"]
    poisson_reqs = make_requests(cfg, cfg.poisson_requests, vocab, cfg.seed + 1)
    arrivals = poisson_arrivals(cfg.poisson_requests, rate, cfg.seed + 2)
    log.info("Poisson arrivals at %.2f req/s: continuous, then static batching", rate)
    poisson = {"rate_per_s": rate, "continuous": summarize(runners.engine_poisson(engine, poisson_reqs, arrivals))}
    engine.stop()
    static = Engine(dataclasses.replace(settings, scheduling="static"), base).start()
    load_all(static)
    runners.engine_closed_loop(static, warm, cfg.concurrency, True)
    poisson["static"] = summarize(runners.engine_poisson(static, poisson_reqs, arrivals))
    static.stop()

    log.info("(e): through gRPC, untraced and traced in turn")
    tracing_runs: dict[str, list[float]] = {"off": [], "on": []}
    spans_exported = 0
    for round_ in range(cfg.tracing_rounds):
        for mode in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
            telemetry, client_provider, exporter = None, None, None
            if mode == "on":
                provider, processor, exporter = tracing.traced_provider()
                client_provider, _, _ = tracing.traced_provider()
                telemetry = build_telemetry(settings, span_processors=[processor])
            server = BackgroundServer(settings, base=base, telemetry=telemetry)
            try:
                with lc.Client(server.target, timeout=600) as client:
                    for name, source in zip(names, sources):
                        client.load_adapter(name, source=source)
                runners.grpc_closed_loop(server.target, warm, cfg.concurrency, client_provider)
                summary = summarize(runners.grpc_closed_loop(server.target, reqs, cfg.concurrency, client_provider))
                tracing_runs[mode].append(summary["output_tokens_per_s"])
                if mode == "off" and round_ == 0:
                    systems["e_loramux_grpc"] = summary
                    rpc = micro.one_token_rpc(server.engine, server.target, cfg, reqs[0].prompt)
            finally:
                server.stop()
            if telemetry is not None:
                telemetry.shutdown()
                client_provider.shutdown()
                spans_exported += exporter.spans
    off, on = (sum(tracing_runs[m]) / len(tracing_runs[m]) for m in ("off", "on"))
    traced = {"tokens_per_s_off": tracing_runs["off"], "tokens_per_s_on": tracing_runs["on"],
              "overhead": round(1 - on / off, 4), "server_spans_exported": spans_exported}

    log.info("(c) and (d): peft")
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=base.dtype).to(base.device).eval()
    peft_model = PeftModel.from_pretrained(hf, sources[0], adapter_name=names[0])
    for name, source in zip(names[1:], sources[1:]):
        peft_model.load_adapter(source, adapter_name=name)
    pad = base.pad_token_id
    in_own_thread(runners.peft_mixed_batches, peft_model, warm, cfg.concurrency, pad)
    systems["c_peft_adapter_names"] = summarize_rounds(
        [in_own_thread(runners.peft_mixed_batches, peft_model, reqs, cfg.concurrency, pad) for _ in range(cfg.rounds)]
    )
    systems["d_peft_naive"] = summarize(in_own_thread(runners.peft_naive, peft_model, reqs, cfg.concurrency, pad))
    del peft_model, hf

    log.info("microbenchmarks")
    wide = dataclasses.replace(settings, adapter_slots=max(cfg.step_rows, cfg.slots), host_cache_mib=0)
    wide_base = load_base_model(wide)
    step = in_own_thread(micro.decode_step, wide_base, cfg)
    promote = in_own_thread(micro.promotion, wide_base, cfg, step["base_step_ms"])
    fusion = in_own_thread(micro.shrink_fusion, wide_base, cfg, step["base_step_ms"])
    disk = in_own_thread(micro.disk_reads, Engine(wide, wide_base), cfg, sources)

    results = {
        "config": dataclasses.asdict(cfg),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": in_own_thread(torch.get_num_threads),
                    "device": str(base.device), "dtype": str(base.dtype).removeprefix("torch."),
                    "gpu": torch.cuda.get_device_name() if base.device.type == "cuda" else None},
        "systems": systems,
        "poisson": poisson,
        "micro": {"decode_step": step, "promotion": promote, "disk": disk, "rpc": rpc, "shrink_fusion": fusion},
        "tracing": traced,
    }
    results["ratios"] = report.ratios(results)
    results["targets"] = report.targets(results)
    results["wall_s"] = round(time.monotonic() - started, 1)
    return results


if __name__ == "__main__":
    raise SystemExit(main())
