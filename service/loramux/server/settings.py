"""The one validated settings object, built at start-up and passed down.

Nothing in the server reads the environment; `loramux serve` builds this from its flags.
"""

from __future__ import annotations

import dataclasses
import math
import socket
from pathlib import Path

from loramux.server.errors import InvalidSettings

DTYPES = ("auto", "float32", "bfloat16", "float16")
LORA_DTYPES = ("float32", "serving")
LORA_KERNELS = ("torch", "triton")
DEVICES = ("auto", "cpu", "cuda")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
KV_CACHES = ("dynamic", "static")
QUANTIZATIONS = ("none", "int8", "bnb-8bit", "bnb-4bit")
BASE_MISMATCH_POLICIES = ("error", "warn")
SCHEDULING = ("continuous", "static")
AUTH_MODES = ("keys", "none")
EXPORTERS = ("otlp", "console")
OTLP_PROTOCOLS = ("grpc", "http/protobuf")
# Object storage through fsspec: s3 (s3fs, the s3 extra); gs and az need gcsfs or adlfs
# installed beside it.
OBJECT_PROTOCOLS = ("s3", "gs", "az")
_REPLICA_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
ALL_LINEAR = "all-linear"  # peft's shorthand: every Linear (and Conv1D) layer but the output layer
# Fields that take one of a few values (the serve command's flags offer them as choices).
CHOICES = {"dtype": DTYPES, "lora_dtype": LORA_DTYPES, "lora_kernel": LORA_KERNELS, "device_map": DEVICE_MAPS, "quantization": QUANTIZATIONS, "kv_cache": KV_CACHES,
           "scheduling": SCHEDULING, "base_mismatch": BASE_MISMATCH_POLICIES, "auth": AUTH_MODES,
           "otlp_protocol": OTLP_PROTOCOLS}
DEFAULT_TARGET_MODULES = (ALL_LINEAR,)


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str
    """Local directory or Hugging Face Hub id of the base model."""
    revision: str | None = None
    """Hub revision of the base model; ignored for a local directory."""
    model_name: str | None = None
    """Name adapters' `base_model_name_or_path` is checked against; defaults to `model`."""
    dtype: str = "auto"
    """Serving dtype: auto (the checkpoint's, float32 on CPU when it is 16-bit), float32, bfloat16, float16."""
    lora_dtype: str = "float32"
    """The LoRA path's dtype. float32: adapters' weights are held and multiplied in float32 and
    their output added to the base layer's in float32, rounded to the serving dtype once, as
    peft computes it (its adapters are upcast to float32 on a 16-bit base), so 16-bit serving
    stays as close to the float32 model as peft is. serving: held and computed in the serving
    dtype, half the adapter memory under bfloat16/float16, further from float32."""
    lora_kernel: str = "torch"
    """How the LoRA path runs. torch: two GEMMs over the batch's adapters side by side, each
    row's columns masked (four operators per layer). triton: Triton kernels for the whole
    batch (a shrink and an expansion per layer, q/k/v and gate/up sharing one shrink), each
    row reading only its own adapter where its slot holds it (CUDA; not with compile). Which
    is faster on a GPU is measured by scripts/gpu/ before it becomes the default."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda when available)."""
    device_map: str | None = None
    """Place the model's layers over several devices with accelerate: auto, balanced,
    balanced_low_0 or sequential (None: all on `device`). Adapter slots live on each layer's
    own device; inputs go to the embedding's."""
    quantization: str = "none"
    """How the base's Linear weights (all but the output projection) are held: none; int8
    (torchao's int8 weight-only, a scale per output row); bnb-8bit (bitsandbytes LLM.int8());
    bnb-4bit (bitsandbytes NF4, computing in `dtype`). The LoRA path stays in `lora_dtype` on top;
    merges read the full-precision files."""
    kv_cache: str = "dynamic"
    """dynamic: the running batch's KV cache is padded to its widest row and grows with it
    (memory follows the batch, bounded by max_batch_tokens). static: max_batch_size rows of
    kv_cache_tokens positions each, allocated at start-up; rows join and leave without
    re-concatenating the cache, each request's context is kv_cache_tokens, and a request
    waits while every row is taken."""
    kv_cache_tokens: int | None = None
    """With kv_cache static: positions per row, i.e. each request's prompt plus output at most
    (None: max_batch_tokens / max_batch_size, within the model's context)."""
    compile: bool = False
    """Compile the decode step with torch.compile, the batched LoRA path inside the graph
    (start-up compiles and warms it; adapters and batch compositions never recompile)."""
    cuda_graphs: bool = False
    """Replay the decode step as CUDA graphs, one per bucket of rows and KV width, captured as
    buckets are first met; adapters and compositions are buffer values, never a new capture.
    Needs a CUDA device, kv_cache static and lora_kernel triton."""
    overlap_steps: bool = True
    """On a CUDA device, queue each decode step before handing on the previous step's tokens,
    so the host's work per row (stop conditions, detokenizing, events) runs while the device
    computes the next step; a finished row costs one step it does not use. Not yet measured
    on a GPU. Off: one step at a time. The CPU always runs one step at a time (the model runs
    on the engine thread there: nothing would overlap)."""
    engine_process: bool = False
    """Run the engine (the model, its thread, adapters, merges) in a process of its own, as
    vLLM's engine core does: the front doors, authentication and the calls' telemetry stay in
    the server's process, and each engine step's events cross to it as one message. The
    engine's step then shares no interpreter lock with the front doors' work (measured on 2
    CPUs in docs/benchmarks.md). Costs a second Python process (and its tokenizer)."""
    host: str = "127.0.0.1"
    """Address the gRPC port listens on (0.0.0.0: every interface)."""
    port: int = 50051
    """0 picks a free port (tests)."""
    adapter_roots: tuple[Path, ...] = ()
    """Directories local adapter sources must lie under. None: only Hub sources load."""
    merge_root: Path | None = None
    """Directory merged checkpoints are written under. None: Merge is refused."""
    merge_shard_mib: int | None = None
    """Merged checkpoints' shards at most this many MiB (None: as large as the base's largest
    shard; never larger, so a merge holds about two shards in host memory)."""
    hub_cache_dir: Path | None = None
    """Hugging Face cache for the Hub base model and adapters (None: huggingface_hub's default)."""
    hub_offline: bool = False
    """Resolve the Hub base model and adapters from the local cache only."""
    hub_endpoint: str | None = None
    """The Hub's address (a mirror, or a Hub on loopback in tests); None: huggingface_hub's default."""
    adapter_slots: int = 64
    """Tier 1: adapters resident on the accelerator at once, at most (see adapter_memory_mib)."""
    adapter_memory_mib: float | None = None
    """Tier 1: MiB of accelerator memory for resident adapters' weights, counted at their true
    sizes. None: the size of 8 adapters of max_lora_rank on every served module (so 8 such
    adapters, or 32 of a quarter of that rank, stay resident)."""
    host_cache_mib: int = 1024
    """Tier 2: MiB of host memory for adapters evicted from slots."""
    max_lora_rank: int = 64
    """Adapters of higher rank are refused. Memory follows each adapter's own rank; this sizes
    the default accelerator budget and the room kept free of pins."""
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    """Base modules (by short name) that get adapter slots, or `all-linear` (the default): every
    Linear and Conv1D layer but the output layer, as peft reads it. Adapters may target any
    subset; a module no adapter in a batch targets costs that batch nothing."""
    max_batch_size: int = 16
    """Rows decoding together at most."""
    max_batch_tokens: int = 65536
    """The padded KV cache the running batch may reach, in token slots: rows x (the widest row's
    prompt and output). Bounds KV cache memory. A request that alone needs more is refused."""
    max_prefill_tokens: int = 4096
    """Prompt tokens prefilled in one step at most (a longer prompt is prefilled alone)."""
    batch_window_ms: float = 5.0
    """When nothing runs: requests are prefilled once none has arrived for this long (or a full
    batch waits), and at most 4 windows after the first of them arrived. Clients that come back
    together (a closed loop, a fan-out) start together instead of in fragments."""
    join_ratio: float = 0.25
    """While rows decode, waiting requests join (are prefilled, stalling the running rows for
    one pass) once they number this share of the running rows, or could fill the batch
    (prefilling together is cheaper per token); with --join-max-steps above 0."""
    join_max_steps: int = 0
    """... or once the oldest has waited this many decode steps. 0: waiting requests join at
    the next step (measured best for time to first token at the same tokens/s)."""
    adapter_wait_ms: float = 2000.0
    """How long a request may be passed over for requests whose adapters are already in slots;
    after that it goes first and holds up admission until it gets a slot."""
    scheduling: str = "continuous"
    """continuous: new requests join the running batch at the next step. static: a new batch
    starts only when the running one has finished (the baseline the benchmark compares with)."""
    max_queue: int = 256
    """Requests waiting beyond this are refused with RESOURCE_EXHAUSTED (and a retry hint)."""
    max_queue_per_tenant: int | None = None
    """Requests one tenant may have waiting, at most. None: no fixed bound; a full queue is
    shared out instead (a lighter tenant's request takes the newest place of the tenant holding
    the most, which is refused), so one tenant alone may use it all and never shuts others out."""
    tenant_max_adapters: int | None = 1000
    """Adapters one tenant may have registered at once, unless the keys file gives its
    `adapters` quota (None: unlimited)."""
    tenant_max_merge_outputs: int | None = 8
    """Merge outputs one tenant may keep under the merge root at once (merges under way
    included), unless the keys file gives its `merge_outputs` quota (None: unlimited)."""
    tenant_max_merge_output_gib: int | None = None
    """GiB of merge outputs one tenant may keep, unless the keys file gives its
    `merge_output_gib` quota (None: no limit beyond the count)."""
    merge_disk_reserve_mib: int = 1024
    """A merge starts only if the merge root's disk keeps this much free after it (and after
    the merges queued before it); with the state directory on the same disk, that room is
    what keeps its records writable."""
    default_max_new_tokens: int = 64
    """Tokens a request generates at most when it does not say."""
    max_new_tokens_limit: int = 4096
    """The most tokens a request may ask for (max_new_tokens)."""
    max_prompt_bytes: int = 1 << 20
    """Prompt text (prompt, or all messages) above this many UTF-8 bytes is refused before it is
    tokenized (PROMPT_TOO_LONG), which bounds the time and memory one request spends tokenizing."""
    slot_wait_s: float = 10.0
    """LoadAdapter with warm or pin: how long to wait for a free slot (at most the call's
    deadline) before answering NO_SLOT_AVAILABLE; the registration stands either way."""
    engine_stall_s: float = 60.0
    """Health reports NOT_SERVING while one engine pass has run longer than this, or the engine
    thread has died."""
    state_dir: Path | None = None
    """Where registrations and operations are kept across restarts (None: nothing is kept).
    Replicas may share one on a ReadWriteMany volume: each sees the others' registrations."""
    registry: str | None = None
    """An object-storage URL (s3://bucket/prefix) holding the adapter registrations that every
    replica serves, instead of `state_dir`/adapters. Operations stay in `state_dir`."""
    operation_retention_s: float = 7 * 24 * 3600.0
    """Finished operations (every replica's, in state_dir) are kept this long for Get/List/Wait,
    then removed; at most 1000 finished ones are kept per tenant in any case."""
    registry_sync_s: float = 2.0
    """How often each replica reads the shared registrations and follows what other replicas
    registered, replaced, pinned or unloaded (with state_dir or registry)."""
    replica_id: str | None = None
    """This replica's name in the shared state (its operations and heartbeat); None: the host
    name (a pod's name on Kubernetes)."""
    object_roots: tuple[str, ...] = ()
    """Object-storage URL prefixes (s3://bucket/prefix) adapter sources may lie under."""
    object_endpoint_url: str | None = None
    """The endpoint of an S3-compatible store (MinIO, Ceph); None: AWS's. Credentials come from
    the standard AWS environment (AWS_ACCESS_KEY_ID, ...) or the pod's role."""
    object_cache_dir: Path | None = None
    """Local disk where adapters fetched from object storage are kept while registered; not to
    be shared between replicas. None: a new temporary directory, removed at exit."""
    base_mismatch: str = "error"
    """When an adapter names another base model: refuse it (error) or log and load (warn)."""
    allow_pickle_weights: bool = False
    """Load adapter_model.bin (torch.load with weights_only=True) when no safetensors file exists."""
    auth: str = "keys"
    """keys: every call needs an API key from `auth_keys_file`, which names its tenant and role.
    none: no credentials, every call is an operator of `default_tenant` (development only)."""
    auth_keys_file: Path | None = None
    """The keys file (YAML or JSON, hashes only; reloaded when it changes). Required with auth=keys."""
    default_tenant: str = "default"
    """The tenant of every call with auth=none."""
    max_connection_age_s: float = 300.0
    """Clients reconnect after this long (0: never), so that they see replicas added since (with
    DNS targets and affinity routing); calls in flight get 60 s more to finish."""
    tls_cert: Path | None = None
    """PEM certificate chain the server presents (with tls_key): the port speaks TLS only."""
    tls_key: Path | None = None
    """PEM private key of tls_cert."""
    tls_client_ca: Path | None = None
    """PEM CA bundle: clients must present a certificate it signed (mutual TLS); a certificate
    named in the keys file's `certificates` identifies its caller without a key."""
    health_port: int | None = None
    """A second, plaintext port serving grpc.health.v1 alone (the same status as the main port),
    for probes that cannot speak TLS, such as Kubernetes' native gRPC probes (0 picks a free
    port; None: off). It reveals nothing but whether the server is serving."""
    http_port: int | None = None
    """Serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models)
    on this port of `host`, with the same keys, tenants and limits as gRPC, and TLS when
    tls_cert is set (0 picks a free port; None, the default: off, so no port opens unasked)."""
    shutdown_grace_s: float = 5.0
    """On SIGTERM: how long work in flight may finish before it is ended with SHUTTING_DOWN."""
    service_name: str = "loramux"
    """OpenTelemetry service.name of traces and metrics."""
    traces_exporters: tuple[str, ...] = ()
    """Where spans go: any of otlp, console (none: tracing off)."""
    metrics_exporters: tuple[str, ...] = ()
    """Where metrics are pushed besides Prometheus: any of otlp, console."""
    otlp_protocol: str = "grpc"
    """grpc or http/protobuf."""
    otlp_endpoint: str | None = None
    """OTLP collector endpoint (None: the exporter's default or OTEL_EXPORTER_OTLP_ENDPOINT)."""
    metrics_port: int | None = None
    """Serve Prometheus text at http://<metrics_host>:<port>/metrics (0 picks a free port; None: off)."""
    metrics_host: str = "127.0.0.1"
    """Address of the metrics endpoint: loopback unless given, whatever `host` is. Its series
    carry tenant names and the busiest adapters' ids, which the API shows a tenant only of its
    own, and it asks for no credentials: expose it (0.0.0.0, a pod IP) only to the scraper."""

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> InvalidSettings:
            return InvalidSettings(f"{field}: {why}", field=field)

        if not self.model:
            raise bad("model", "a local directory or Hub id is required")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.lora_kernel not in LORA_KERNELS:
            raise bad("lora_kernel", f"{self.lora_kernel!r} is not one of {', '.join(LORA_KERNELS)}")
        if self.lora_kernel == "triton" and self.compile:
            raise bad("lora_kernel", "the compiled decode step runs the torch LoRA path; use lora_kernel torch "
                      "with compile")
        if self.cuda_graphs:
            for needed, field, why in ((self.kv_cache == "static", "kv_cache", "kv_cache static (a graph's cache "
                                        "never moves)"),
                                       (self.lora_kernel == "triton", "lora_kernel", "lora_kernel triton (the "
                                        "kernels read each row's adapter from buffers)"),
                                       (not self.compile, "compile", "compile off (one or the other)"),
                                       (self.device_map is None, "device_map", "one device")):
                if not needed:
                    raise bad("cuda_graphs", f"CUDA graphs need {why}; set {field} accordingly")
        if self.lora_dtype not in LORA_DTYPES:
            raise bad("lora_dtype", f"{self.lora_dtype!r} is not one of {', '.join(LORA_DTYPES)}")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise bad("device_map", f"{self.device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
        if self.quantization not in QUANTIZATIONS:
            raise bad("quantization", f"{self.quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
        if self.kv_cache not in KV_CACHES:
            raise bad("kv_cache", f"{self.kv_cache!r} is not one of {', '.join(KV_CACHES)}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 2:
            raise bad("kv_cache_tokens", f"must be >= 2, got {self.kv_cache_tokens}")
        if self.compile and self.quantization.startswith("bnb-"):
            raise bad("compile", "bitsandbytes' quantized layers do not compile into one graph; use quantization "
                      "none or int8 with compile")
        if self.compile and self.device_map is not None:
            raise bad("compile", "a model placed over several devices (device_map) is served eagerly; leave compile off")
        if not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise bad("device", f"{self.device!r} is not one of {', '.join(DEVICES)} or cuda:N")
        if not 0 <= self.port <= 65535:
            raise bad("port", f"{self.port} is not a TCP port")
        for name, value, low in (
            ("adapter_slots", self.adapter_slots, 1),
            ("max_lora_rank", self.max_lora_rank, 1),
            ("max_batch_size", self.max_batch_size, 1),
            ("max_batch_tokens", self.max_batch_tokens, 2),
            ("max_prefill_tokens", self.max_prefill_tokens, 1),
            ("join_max_steps", self.join_max_steps, 0),
            ("max_queue", self.max_queue, 1),
            ("default_max_new_tokens", self.default_max_new_tokens, 1),
            ("max_new_tokens_limit", self.max_new_tokens_limit, 1),
            ("host_cache_mib", self.host_cache_mib, 0),
            ("max_prompt_bytes", self.max_prompt_bytes, 1),
            ("merge_shard_mib", 1 if self.merge_shard_mib is None else self.merge_shard_mib, 1),
            ("tenant_max_adapters", 0 if self.tenant_max_adapters is None else self.tenant_max_adapters, 0),
            ("tenant_max_merge_outputs", 0 if self.tenant_max_merge_outputs is None else self.tenant_max_merge_outputs, 0),
            ("tenant_max_merge_output_gib",
             0 if self.tenant_max_merge_output_gib is None else self.tenant_max_merge_output_gib, 0),
            ("merge_disk_reserve_mib", self.merge_disk_reserve_mib, 0),
        ):
            if value < low:
                raise bad(name, f"must be >= {low}, got {value}")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise bad("default_max_new_tokens", "must not exceed max_new_tokens_limit")
        for name in ("batch_window_ms", "adapter_wait_ms", "join_ratio", "slot_wait_s", "engine_stall_s",
                     "shutdown_grace_s", "adapter_memory_mib", "max_connection_age_s", "registry_sync_s"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise bad(name, f"must be a finite number, got {value}")
        if self.adapter_memory_mib is not None and not self.adapter_memory_mib > 0:
            raise bad("adapter_memory_mib", f"must be > 0, got {self.adapter_memory_mib}")
        if not self.engine_stall_s > 0:
            raise bad("engine_stall_s", f"must be > 0, got {self.engine_stall_s}")
        for name in ("batch_window_ms", "adapter_wait_ms", "join_ratio", "slot_wait_s", "max_connection_age_s"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.scheduling not in SCHEDULING:
            raise bad("scheduling", f"{self.scheduling!r} is not one of {', '.join(SCHEDULING)}")
        if self.max_queue_per_tenant is not None and not 1 <= self.max_queue_per_tenant <= self.max_queue:
            raise bad("max_queue_per_tenant", f"must be in 1..max_queue ({self.max_queue}), got {self.max_queue_per_tenant}")
        if not self.target_modules:
            raise bad("target_modules", "at least one module name is required")
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise bad("target_modules", "all-linear already names every Linear layer; give it alone, or only names")
        if self.base_mismatch not in BASE_MISMATCH_POLICIES:
            raise bad("base_mismatch", f"{self.base_mismatch!r} is not one of {BASE_MISMATCH_POLICIES}")
        for name, values in (("traces_exporters", self.traces_exporters), ("metrics_exporters", self.metrics_exporters)):
            odd = [v for v in values if v not in EXPORTERS]
            if odd:
                raise bad(name, f"{odd[0]!r} is not one of {', '.join(EXPORTERS)}")
        if self.otlp_protocol not in OTLP_PROTOCOLS:
            raise bad("otlp_protocol", f"{self.otlp_protocol!r} is not one of {', '.join(OTLP_PROTOCOLS)}")
        if self.auth not in AUTH_MODES:
            raise bad("auth", f"{self.auth!r} is not one of {', '.join(AUTH_MODES)}")
        if self.auth == "keys" and self.auth_keys_file is None:
            raise bad("auth_keys_file", "a keys file is required to serve with API keys (create one with `loramux keys "
                      "create`); --auth none serves without credentials, for development only")
        if self.auth_keys_file is not None:
            object.__setattr__(self, "auth_keys_file", Path(self.auth_keys_file).expanduser().resolve())
        if (self.tls_cert is None) != (self.tls_key is None):
            raise bad("tls_cert" if self.tls_cert is None else "tls_key", "tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise bad("tls_client_ca", "mutual TLS needs the server's own tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, name)
            if value is not None:
                path = Path(value).expanduser().resolve()
                if not path.is_file():
                    raise bad(name, f"{path.name} is not a readable file")
                object.__setattr__(self, name, path)
        for name in ("metrics_port", "health_port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise bad(name, f"{value} is not a TCP port")
        roots = tuple(Path(r).expanduser().resolve() for r in self.adapter_roots)
        for root in roots:
            if not root.is_dir():
                raise bad("adapter_roots", f"{root} is not a directory")
        object.__setattr__(self, "adapter_roots", roots)
        if self.merge_root is not None:
            merge_root = Path(self.merge_root).expanduser().resolve()
            merge_root.mkdir(parents=True, exist_ok=True)
            object.__setattr__(self, "merge_root", merge_root)
        if self.state_dir is not None:
            state_dir = Path(self.state_dir).expanduser().resolve()
            try:
                state_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise bad("state_dir", f"cannot be created: {e.strerror}") from None
            object.__setattr__(self, "state_dir", state_dir)
        if not (math.isfinite(self.operation_retention_s) and self.operation_retention_s > 0):
            raise bad("operation_retention_s", f"must be a finite number > 0, got {self.operation_retention_s}")
        if not self.registry_sync_s > 0:
            raise bad("registry_sync_s", f"must be > 0, got {self.registry_sync_s}")
        for name, urls in (("object_roots", self.object_roots), ("registry", (self.registry,) if self.registry else ())):
            for url in urls:
                protocol = url.split("://", 1)[0] if "://" in url else ""
                if protocol not in OBJECT_PROTOCOLS or not url.split("://", 1)[1].strip("/"):
                    raise bad(name, f"{url!r} is not a {', '.join(p + '://bucket/prefix' for p in OBJECT_PROTOCOLS)} URL")
        object.__setattr__(self, "object_roots", tuple(u.rstrip("/") for u in self.object_roots))
        if self.replica_id is None:
            object.__setattr__(self, "replica_id", socket.gethostname())
        if not self.replica_id or len(self.replica_id) > 253 or not set(self.replica_id) <= _REPLICA_CHARS:
            raise bad("replica_id", f"{self.replica_id!r} must be 1-253 letters, digits, '-', '_' and '.'")
        if self.object_cache_dir is not None:
            object.__setattr__(self, "object_cache_dir", Path(self.object_cache_dir).expanduser().resolve())

    @property
    def host_cache_bytes(self) -> int:
        return self.host_cache_mib * 1024 * 1024

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.model

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name requests may give the base model by (no adapter may take one)."""
        return tuple(dict.fromkeys((self.served_model_name, self.public_model_name)))

    @property
    def public_model_name(self) -> str:
        """The model's name as clients see it: a local directory is shown by its last component,
        never by its server path."""
        if self.model_name:
            return self.model_name
        local = Path(self.model).expanduser()
        return local.name if local.is_absolute() or local.exists() else self.model


def check_installed(settings: Settings) -> None:
    """Refuse at start-up, naming the extra to install, an option whose package is missing
    (rather than failing at the first request that needs it)."""
    import importlib.util

    wanted = []  # (field, module, what to install)
    if settings.quantization == "int8":
        wanted.append(("quantization", "torchao", "the quant extra: pip install 'loramux[quant]'"))
    elif settings.quantization.startswith("bnb-"):
        wanted.append(("quantization", "bitsandbytes", "the quant extra: pip install 'loramux[quant]'"))
    for field, urls in (("object_roots", settings.object_roots), ("registry", (settings.registry or "",))):
        for url in urls:
            if url.startswith("s3://"):
                wanted.append((field, "s3fs", "the s3 extra: pip install 'loramux[s3]'"))
            elif url.startswith("gs://"):
                wanted.append((field, "gcsfs", "the gcsfs package"))
            elif url.startswith("az://"):
                wanted.append((field, "adlfs", "the adlfs package"))
    for field, module, install in wanted:
        if importlib.util.find_spec(module) is None:
            raise InvalidSettings(f"{getattr(settings, field)!r} needs {module}, which is not installed: install {install}",
                                  field=field)
