"""`python -m loramux.bench --quick`: every system serves the same workload and the report is complete."""

import json

from loramux.bench.__main__ import main
from loramux.bench.config import BenchConfig
from loramux.bench.report import SYSTEMS
from loramux.bench.workload import make_requests


def test_quick_benchmark_runs_every_system_on_the_same_work(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    cfg = BenchConfig.quick()
    reqs = make_requests(cfg, cfg.requests, (3, 4), cfg.seed)  # lengths do not depend on the vocabulary
    expected_tokens = sum(r.output_tokens for r in reqs)
    assert set(results["systems"]) == set(SYSTEMS)
    for name, system in results["systems"].items():
        # Exactly the requested tokens: no system stopped early or did extra work.
        assert (system["requests"], system["output_tokens"]) == (cfg.requests, expected_tokens), name
        assert system["output_tokens_per_s"] > 0 and system["ttft_p50_ms"] <= system["ttft_p99_ms"], name
    assert results["poisson"]["continuous"]["requests"] == cfg.poisson_requests
    assert [t["what"] for t in results["targets"]][:2] == [
        "decode step, 16 distinct adapters / base step", "(a) / (b) throughput"
    ]
    assert all(isinstance(t["met"], bool) for t in results["targets"]) and len(results["targets"]) == 9
    assert results["micro"]["disk"]["registered_large"] == cfg.registered_large
    fusion = results["micro"]["shrink_fusion"]
    assert fusion["separate_ms_per_layer"] > 0 and fusion["fused_ms_per_layer"] > 0
    tracing = results["tracing"]
    assert len(tracing["tokens_per_s_off"]) == len(tracing["tokens_per_s_on"]) == 2
    # Traced runs really traced: per request at least a client span, a server span and the engine's.
    assert tracing["server_spans_exported"] >= 2 * (cfg.requests + cfg.concurrency) * 5
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| (a) loramux engine, mixed adapters |" in (tmp_path / "results.md").read_text()


def test_quick_matrix_runs_every_system_at_default_flags(tmp_path):
    from loramux.bench.matrix import SYSTEMS as MATRIX_SYSTEMS, TARGETS, MatrixConfig, main as matrix_main

    assert matrix_main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "matrix.json").read_text())
    cfg = MatrixConfig.quick()
    assert results["server_flags"].startswith("defaults")
    assert len(results["cells"]) == len(cfg.models) * len(cfg.shapes) * len(cfg.samplings)
    margins = [min(r["margin"] for r in c["ratios"].values()) for c in results["cells"]]
    assert margins == sorted(margins)  # the worst cell first
    for cell in results["cells"]:
        assert set(cell["systems"]) == set(MATRIX_SYSTEMS) and set(cell["ratios"]) == set(TARGETS)
        for name, system in cell["systems"].items():  # every system did exactly the same work
            assert (system["requests"], system["output_tokens"]) == (cfg.requests, cfg.requests * cfg.output_tokens), name
        mixed, base_only = cell["systems"]["loramux_mixed"], cell["systems"]["loramux_base_only"]
        # The engine's counters: base-only steps read no adapter bytes, mixed ones some.
        assert base_only["adapter_bytes_per_step"] == 0 < mixed["adapter_bytes_per_step"]
        assert mixed["decode_steps"] >= cfg.output_tokens - 1 and mixed["prefills"] >= 1
        assert 0 < cell["mixed_base_bandwidth_floor"] < 1
        assert mixed["load_generator_cpu_s"] > 0 and base_only["load_generator_cpu_s"] > 0
    # Resident adapters take their true size (exactly, on the CPU), whatever the max rank.
    assert all(r["max_relative_excess"] == 0 for r in results["resident_bytes"])
    assert len(results["decode_step"]) == len(cfg.models) and results["decode_step"][0]["ratio"] > 0
    assert "| h128x2 |" in (tmp_path / "matrix.md").read_text()


def test_quick_merge_benchmark_measures_both_systems_in_fresh_processes(tmp_path):
    from loramux.bench.merge import main as merge_main

    assert merge_main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "merge.json").read_text())
    (cell,) = results["cells"]
    assert cell["shards"] >= 4 and cell["target_bytes"] == 2 * cell["largest_shard_bytes"] + cell["adapter_bytes"]
    for system in ("loramux", "peft"):
        assert cell[system]["peak_bytes"] > 0 and cell[system]["mb_per_s"] > 0
    # At this size one-time library buffers dominate both peaks: their comparison is the full
    # benchmark's (docs/benchmarks.md).
    assert "| h256-l4 (13 MiB) |" in (tmp_path / "merge.md").read_text()


def test_quick_quantization_benchmark_compares_int8_with_full_precision(tmp_path):
    from loramux.bench.quantization import main as quantization_main

    assert quantization_main(["--quick", "--out", str(tmp_path)]) == 0
    (cell,) = json.loads((tmp_path / "quantization.json").read_text())["cells"]
    for method in ("int8", "bnb-8bit", "bnb-4bit"):
        row = cell[method]
        assert row["model_bytes"] < cell["none"]["model_bytes"] and 0 < row["memory_saved"] < 1, method
        assert all(s > 0 for s in row["tokens_per_s"]) and 0 < row["max_logit_error"] < 0.5, method
        same, total = map(int, row["sequences_equal"].split("/"))
        assert total == 5 * 8 and 0 <= same <= total, method
    assert "| h128-l2 | bnb-4bit |" in (tmp_path / "quantization.md").read_text()


def test_quick_inference_options_benchmark_runs_eager_static_and_compiled_and_agrees_with_eager(tmp_path):
    from loramux.bench.inference_options import CONFIGS, QUICK_CONFIGS
    from loramux.bench.inference_options import main as options_main

    assert options_main(["--quick", "--out", str(tmp_path)]) == 0
    (cell,) = json.loads((tmp_path / "inference_options.json").read_text())["cells"]
    assert set(QUICK_CONFIGS) <= set(cell) and not set(CONFIGS) - set(QUICK_CONFIGS) & set(cell)
    for config in QUICK_CONFIGS:
        flags = CONFIGS[config]
        row = cell[config]
        assert all(s > 0 for s in row["tokens_per_s"]) and all(ms > 0 for ms in row["step_ms"]), config
        assert row["long_step_ms"] > 0, config
        assert row["graphs"] == (2 if flags.get("compile") else 0), config
        assert (row["kv_cache_bytes"] > 0) == (flags.get("kv_cache") == "static"), config
        if config != "eager":
            # Greedy fp32: the same tokens as the eager server (the peft oracle's, tested elsewhere).
            assert row["sequences_equal"] == f"{5 * 6}/{5 * 6}", config
    assert "| h128-l2 | compile+static |" in (tmp_path / "inference_options.md").read_text()


def test_quick_front_doors_benchmark_measures_both_doors_round_by_round(tmp_path):
    from loramux.bench.front_doors import main as doors_main

    assert doors_main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "front_doors.json").read_text())
    (cell,) = results["cells"]
    assert results["shipping_us_per_step"] > 0
    for door in ("grpc", "http", "engine", "grpc_split", "http_split"):
        assert len(cell[door]["tokens_per_s"]) == 1 and cell[door]["tokens_per_s"][0] > 0
        assert len(cell[door]["step_ms"]) == 1 and cell[door]["step_ms"][0] > 0
    assert cell["http_over_grpc_tokens_per_s"]["median"] > 0
    assert cell["grpc_over_engine_step_ms"]["median"] > 0 and cell["http_over_engine_step_ms"]["median"] > 0
    for door in ("grpc", "http"):  # the engine in its own process, its step time read from there
        assert cell[f"{door}_split_over_engine_step_ms"]["median"] > 0
        assert cell[f"{door}_split_over_in_process_tokens_per_s"]["median"] > 0
    report = (tmp_path / "front_doors.md").read_text()
    assert "| h128-l2 | http |" in report and "| h128-l2 | engine |" in report and "| h128-l2 | grpc_split |" in report


def test_quick_generation_controls_benchmark_prices_each_control_against_free_decoding(tmp_path):
    from loramux.bench.generation_controls import main as controls_main, variants

    assert controls_main(["--quick", "--out", str(tmp_path)]) == 0
    (cell,) = json.loads((tmp_path / "generation_controls.json").read_text())["cells"]
    assert set(cell["ms_per_step"]) == set(variants(None, None))
    assert all(len(costs) == 1 and costs[0] > 0 for costs in cell["ms_per_step"].values())
    assert set(cell["over_free"]) == set(cell["ms_per_step"]) - {"free"}
    assert cell["mask_us_per_row"]["schema"] > 0 and cell["mask_us_per_row"]["regex"] > 0
    assert "| h128-l2 | schema, every row |" in (tmp_path / "generation_controls.md").read_text()


def test_quick_join_policy_benchmark_pairs_each_value_with_the_default(tmp_path):
    from loramux.bench.join_policy import QUICK_CANDIDATES, WORKLOADS, main as join_main
    from loramux.server.settings import Settings

    assert join_main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "join_policy.json").read_text())
    assert [c["workload"] for c in results["cells"]] == list(WORKLOADS)
    for cell in results["cells"]:
        assert cell["default"] == Settings.join_max_steps == 0
        assert set(cell["values"]) == {str(v) for v in QUICK_CANDIDATES}
        for value, m in cell["values"].items():
            assert len(m["tokens_per_s"]) == 1 and m["tokens_per_s"][0] > 0 and m["ttft_p99_ms"][0] > 0
            if int(value) == cell["default"]:  # each against itself, paired
                assert [m[f"{k}_over_default"] for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p99_ms")] \
                    == [1.0] * 4
    assert "| h128-l2 | long prompts | 0 (default) |" in (tmp_path / "join_policy.md").read_text()
