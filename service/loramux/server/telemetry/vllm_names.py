"""vLLM's metric names, for the dashboards and routers that read them, made at the Prometheus
endpoint from loramux's own series (OpenTelemetry instrument names cannot hold vLLM's `:`).

Each alias is the loramux series renamed, with `gen_ai_request_model` as vLLM's `model_name`
and `finish_reason` as `finished_reason`; every other label (tenant, operation) is summed
away, as vLLM has none of them.
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client.core import Metric
from prometheus_client.samples import Sample

# loramux's Prometheus family -> vLLM's names for it
ALIASES = {
    "gen_ai_server_time_to_first_token_seconds": ("vllm:time_to_first_token_seconds",),
    "gen_ai_server_time_per_output_token_seconds": ("vllm:time_per_output_token_seconds", "vllm:inter_token_latency_seconds"),
    "gen_ai_server_request_duration_seconds": ("vllm:e2e_request_latency_seconds",),
    "loramux_generate_prompt_tokens": ("vllm:prompt_tokens",),
    "loramux_generate_tokens": ("vllm:generation_tokens",),
    "loramux_generate_requests": ("vllm:request_success",),
    "loramux_queue_depth": ("vllm:num_requests_waiting",),
    "loramux_batch_size": ("vllm:num_requests_running",),
    "loramux_kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
}
LABELS = {"gen_ai_request_model": "model_name", "finish_reason": "finished_reason"}


class VllmNames:
    """A collector: every family of `registry`, then the vLLM-named copies of those in ALIASES."""

    def __init__(self, registry):
        self._registry = registry

    def collect(self):
        for family in self._registry.collect():
            yield family
            for alias in ALIASES.get(family.name, ()):
                yield _renamed(family, alias)


def _renamed(family: Metric, alias: str) -> Metric:
    out = Metric(alias, f"{family.documentation} (loramux: {family.name})", family.type)
    sums: dict[tuple[str, tuple], float] = defaultdict(float)
    for sample in family.samples:
        if sample.name.endswith("_created"):  # a creation time: not summable
            continue
        labels = {LABELS[k]: v for k, v in sample.labels.items() if k in LABELS}
        if "le" in sample.labels:
            labels["le"] = sample.labels["le"]
        sums[(alias + sample.name[len(family.name):], tuple(labels.items()))] += sample.value
    out.samples = [Sample(name, dict(labels), value) for (name, labels), value in sums.items()]
    return out
