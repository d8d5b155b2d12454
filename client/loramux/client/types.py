"""Plain results the client returns (no protobuf in the SDK's surface)."""

from __future__ import annotations

import dataclasses
from datetime import datetime


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class Timings:
    queue_wait_s: float
    time_to_first_token_s: float
    total_s: float


@dataclasses.dataclass(frozen=True)
class PromptScores:
    """The prompt's tokens as the model scored them (prompt_logprobs=): from the second token
    on, each one's log-probability, rank (1: the most likely) and alternatives."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Completion:
    """One of the n completions of a request (n=)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    usage: Usage
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "length", "stop_token" or "stop_sequence"
    usage: Usage  # with n > 1: the prompt once and every completion's tokens
    timings: Timings
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)  # per token, with top_logprobs=
    completions: list[Completion] = dataclasses.field(default_factory=list)  # with n > 1: all of them (the fields above are the first's)
    prompt: PromptScores | None = None  # with prompt_logprobs=


@dataclasses.dataclass(frozen=True)
class Tokens:
    token_ids: list[int]
    max_context: int  # the most tokens one request may hold, prompt and output

    @property
    def count(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class StreamChunk:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None  # set on the last chunk only, with usage and timings
    usage: Usage | None
    timings: Timings | None
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)  # per token, with top_logprobs=
    index: int = 0  # with n > 1: which completion (their chunks interleave)
    prompt: PromptScores | None = None  # with prompt_logprobs=: on a first chunk of its own


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    source: str
    revision: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    tier: str  # "accelerator", "host" or "disk"
    pinned: bool
    last_used: datetime | None
    use_count: int
    use_rslora: bool
    base_model: str
    load_time: datetime | None


@dataclasses.dataclass(frozen=True)
class MergeProgress:
    operation: str
    phase: str  # "queued", "merging", "writing_config", "verifying", "registering", "done"
    tensors_done: int
    tensors_total: int
    percent: float  # of the bytes
    done: bool
    bytes_done: int = 0
    bytes_total: int = 0
    error: str = ""  # a failed (or cancelled) operation's "CODE: message"


@dataclasses.dataclass(frozen=True)
class MergeResult:
    output_path: str
    files: list[str]
    size_bytes: int
    merged_tensors: int
    manifest_sha256: str = ""
    max_logit_difference: float | None = None  # with verify: merged model against base + adapter


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    model_id: str
    model_revision: str
    dtype: str
    device: str
    adapter_slots: int
    host_cache_bytes: int
    max_lora_rank: int
    max_batch_size: int
    max_sequence_length: int
    target_modules: list[str]
    versions: dict[str, str]
    adapter_memory_bytes: int = 0  # accelerator memory for resident adapters (true sizes)
    quantization: str = "none"  # how the base's Linear weights are held
    model_bytes: int = 0  # the base's parameters as served
    kv_cache: str = "dynamic"  # "dynamic" (padded, grows with the batch) or "static" (rows allocated at start-up)
    kv_cache_tokens: int = 0  # static: positions per row (a request's prompt plus output at most)
    kv_cache_bytes: int = 0  # static: the whole cache, allocated at start-up
    compiled: bool = False  # the decode step runs as a compiled graph
    compiled_graphs: int = 0  # graphs start-up compiled
    lora_dtype: str = ""  # the LoRA path's dtype ("float32", or the serving dtype)
    lora_kernel: str = "torch"  # "torch" (masked GEMMs) or "triton" (Triton kernels, each row its own adapter)
    cuda_graphs: bool = False  # the decode step replays CUDA graphs
    cuda_graphs_captured: int = 0  # graphs captured so far
    engine_process: bool = False  # the engine runs in a process of its own (--engine-process)
