"""The engine's one face to the front doors: generation, adapters, merges, operations and what
the server serves, in domain terms, for a caller's tenant.

A front door (gRPC today, HTTP next) authenticates a call, converts its wire format to the
inputs here, calls one method, and converts the result or the typed error (`errors.py`,
mapped in one place per protocol) back. It decides nothing: defaults, adapter-name
resolution, the shared store, limits and waits are all decided here or below. The types a
front door needs are importable from this module alone.

Every method may block (read files, wait for a slot, take the engine's lock): a front door on
an event loop runs them on its worker threads. `generate` returns at once with a `Generation`;
events arrive through `emit` on the engine thread, and a front door whose caller goes away
calls `cancel`, which frees the row at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable

from loramux.server.merging.combine import Combination
from loramux.server.engine.compiled_step import CompiledDecode
from loramux.server.engine.engine import Engine
from loramux.server.engine.graph_step import GraphDecode
from loramux.server.engine.inputs import (
    MAX_COMPLETIONS,
    MAX_LOGIT_BIAS,
    MAX_MESSAGES,
    MAX_STOP_SEQUENCES,
    MAX_STOP_TOKEN_IDS,
    GenerateInput,
    prompt_ids,
    request_context,
)
from loramux.server.engine.request import (
    ErrorEvent, Event, FinishEvent, FinishReason, GenerationRequest, PromptEvent, Timings, TokenEvent,
)
from loramux.server.engine.constraints import Constraint
from loramux.server.merging.merge import MergeJob, MergeResult
from loramux.server.store.operations import Operation
from loramux.server.tiers import Tier

REMOTE_OPERATION_POLL_S = 0.25  # waiting on another replica's operation: how often its record is read

__all__ = [
    "AdapterInfo", "Combination", "Constraint", "ErrorEvent", "Event", "Facade", "FinishEvent", "FinishReason", "GenerateInput",
    "Generation", "MergeJob", "MergeResult", "Operation", "PromptEvent", "ServerInfo", "Tier", "Timings", "TokenEvent",
    # The bounds a request's lists are checked against (a front door may refuse longer ones while parsing).
    "MAX_COMPLETIONS", "MAX_LOGIT_BIAS", "MAX_MESSAGES", "MAX_STOP_SEQUENCES", "MAX_STOP_TOKEN_IDS",
]


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter as a caller may see it (never a server path)."""

    adapter_id: str
    source: str
    revision: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    tier: Tier
    pinned: bool
    last_used: float | None  # epoch seconds
    use_count: int
    use_rslora: bool
    base_model: str
    load_time: float  # epoch seconds


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    model_id: str
    model_revision: str
    dtype: str
    device: str
    adapter_slots: int
    adapter_memory_bytes: int
    host_cache_bytes: int
    max_lora_rank: int
    max_batch_size: int
    max_sequence_length: int
    target_modules: tuple[str, ...]
    quantization: str
    model_bytes: int
    kv_cache: str
    kv_cache_tokens: int
    kv_cache_bytes: int
    compiled: bool
    compiled_graphs: int
    lora_dtype: str
    lora_kernel: str
    cuda_graphs: bool
    cuda_graphs_captured: int
    engine_process: bool  # the engine runs in a process of its own (--engine-process)


@dataclasses.dataclass(frozen=True)
class Generation:
    """A generation under way: what a front door needs to report on it and to cancel it."""

    request: GenerationRequest  # opaque to front doors: hand it back to `cancel`
    model: str  # the served model's name
    max_new_tokens: int  # as asked, or the server's default


class Facade:
    def __init__(self, engine: Engine):
        self._engine = engine
        self.telemetry = engine.telemetry  # the front doors' own metrics and spans use its instruments
        self.model = engine.settings.served_model_name  # the served model's name, as requests' spans name it
        self.public_model = engine.settings.public_model_name  # the name callers see (GetServerInfo, /v1/models)
        self.started = time.time()  # when this server began serving (epoch seconds)

    # -- generation ------------------------------------------------------------------------

    def must_read(self, tenant: str, adapter_id: str) -> bool:
        """Whether `generate` would first read the caller's adapter from the shared store (it
        was registered on another replica and not yet here): then call `resolve` first, where
        slow reads belong. Never blocks."""
        registry = self._engine.registry
        return bool(adapter_id) and registry.shared and not registry.has(tenant, adapter_id)

    def resolve(self, tenant: str, adapter_id: str) -> None:
        """Read the caller's adapter here if it was registered on another replica (I/O)."""
        if adapter_id:
            self._engine.find_adapter(tenant, adapter_id)

    def generate(self, tenant: str, inp: GenerateInput, emit: Callable[[Event], None], deadline: float | None = None,
                 trace_context: object = None) -> Generation:
        """Check, tokenize and queue a request; `deadline`: when the caller stops waiting
        (time.monotonic(), taken when the call arrived: time spent before this runs counts),
        None: never. The adapter name is resolved here, once."""
        engine = self._engine
        record = engine.find_adapter(tenant, inp.adapter_id) if inp.adapter_id else None
        request = engine.submit(tenant, inp, emit, deadline, trace_context=trace_context, record=record)
        return Generation(request, self.model, request.params.max_new_tokens)

    def generate_many(self, tenant: str, inp: GenerateInput, emits: list[Callable[[Event], None]],
                      deadline: float | None = None, trace_context: object = None) -> list[Generation]:
        """`len(emits)` completions of one prompt (OpenAI's `n`, at most MAX_COMPLETIONS): one
        check, one tokenization, one prefill of the prompt when they are admitted together;
        completion i samples with seed + i. Events of completion i arrive through emits[i]."""
        engine = self._engine
        record = engine.find_adapter(tenant, inp.adapter_id) if inp.adapter_id else None
        requests = engine.submit_many(tenant, inp, emits, deadline, trace_context=trace_context, record=record)
        return [Generation(request, self.model, request.params.max_new_tokens) for request in requests]

    def cancel(self, generation: Generation) -> None:
        self._engine.cancel(generation.request)

    def tokenize(self, tenant: str, inp: GenerateInput) -> tuple[list[int], int]:
        """The prompt's (or messages') token ids as Generate would feed them (with the chat
        template of `inp.adapter_id` when it ships one), however long, and the most tokens one
        request may hold (blocking: the tokenizer runs here)."""
        engine = self._engine
        record = engine.find_adapter(tenant, inp.adapter_id) if inp.adapter_id else None
        ids = prompt_ids(inp, engine.base, engine.settings, check_length=False,
                         chat_template=record.spec.chat_template if record else None)
        return ids, request_context(engine.base, engine.settings)

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text, as logprobs name tokens (never blocks: no engine call)."""
        return token_texts(self._engine.base.tokenizer, self._engine.base.decode_text, ids)

    @property
    def special_token_ids(self) -> frozenset[int]:
        """The tokenizer's special tokens (BOS, EOS, ...): no text of their own in an answer."""
        return frozenset(self._engine.base.tokenizer.all_special_ids)

    def decode(self, ids: list[int]) -> str:
        """Token ids as text, special tokens skipped (as generated text is)."""
        return self._engine.base.decode_text(ids)

    def healthy(self) -> bool:
        """Whether the engine makes progress (alive, no pass stalled past engine_stall_s)."""
        return self._engine.healthy(self._engine.settings.engine_stall_s)

    # -- adapters ----------------------------------------------------------------------------

    def load_adapter(self, tenant: str, adapter_id: str, source: str, revision: str = "", pin: bool = False,
                     warm: bool = False, replace: bool = False, deadline: float | None = None) -> AdapterInfo:
        """Register an adapter (and with warm or pin, place it now, waiting for a slot at most
        `slot_wait_s`, and not past `deadline`: the caller's, in time.monotonic())."""
        limit = self._engine.settings.slot_wait_s
        wait = limit if deadline is None else max(0.0, min(limit, deadline - time.monotonic() - 0.05))
        return self._info(self._engine.load_adapter(tenant, adapter_id, source, revision=revision, pin=pin, warm=warm,
                                                    replace=replace, wait_s=wait))

    def unload_adapter(self, tenant: str, adapter_id: str) -> None:
        self._engine.unload_adapter(tenant, adapter_id)

    def get_adapter(self, tenant: str, adapter_id: str) -> AdapterInfo:
        return self._info(self._engine.find_adapter(tenant, adapter_id))

    def list_adapters(self, tenant: str) -> list[AdapterInfo]:
        """The tenant's adapters, by id."""
        return [self._info(record) for record in self._engine.list_adapters(tenant)]

    def _info(self, record) -> AdapterInfo:
        spec = record.spec
        return AdapterInfo(record.adapter_id, record.source, record.revision, spec.rank, spec.alpha,
                           tuple(spec.target_modules), spec.size_bytes, self._engine.tier(record), record.pinned,
                           record.last_used, record.use_count, spec.use_rslora, spec.base_model, record.load_time)

    # -- merges and operations -------------------------------------------------------------

    def merge(self, tenant: str, job: MergeJob, trace_context: object = None) -> Operation:
        return self._engine.merges.start(tenant, job, trace_context=trace_context)

    def get_operation(self, tenant: str, name: str) -> Operation:
        return self._engine.operations.get(tenant, name)

    def list_operations(self, tenant: str, after: str, size: int) -> tuple[list[Operation], bool]:
        """Up to `size` of the tenant's operations named after `after`, and whether more follow."""
        return self._engine.operations.page(tenant, after, size)

    def cancel_operation(self, tenant: str, name: str) -> None:
        self._engine.operations.cancel(tenant, name)

    def delete_operation(self, tenant: str, name: str) -> None:
        self._engine.operations.delete(tenant, name)

    def poll_interval(self, operation: Operation) -> float | None:
        """How a front door waits for `operation`: None when this replica runs it (then
        `on_operation_done` calls back), else the seconds between reads of its record (another
        replica sharing the state directory runs it)."""
        return REMOTE_OPERATION_POLL_S if operation.foreign else None

    def on_operation_done(self, operation: Operation, callback: Callable[[], None]) -> None:
        """Call `callback` once `operation` (run here) is done: at once if it is."""
        self._engine.operations.on_done(operation, callback)

    # -- the server ----------------------------------------------------------------------------

    def server_info(self) -> ServerInfo:
        engine = self._engine
        base, settings = engine.base, engine.settings
        pool, decode = engine.kv_pool, engine.compiled_decode
        return ServerInfo(
            model_id=settings.public_model_name,
            model_revision=base.revision,
            dtype=str(base.dtype).removeprefix("torch."),
            device=str(base.device),
            adapter_slots=settings.adapter_slots,
            adapter_memory_bytes=engine.budget.accelerator_bytes,
            host_cache_bytes=settings.host_cache_bytes,
            max_lora_rank=engine.budget.max_rank,
            max_batch_size=settings.max_batch_size,
            max_sequence_length=base.max_sequence_length,
            target_modules=tuple(sorted({name.rsplit(".", 1)[-1] for name in base.bank.layers})),
            quantization=settings.quantization,
            model_bytes=base.model_bytes,
            kv_cache=settings.kv_cache,
            kv_cache_tokens=pool.tokens if pool is not None else 0,
            kv_cache_bytes=pool.nbytes if pool is not None else 0,
            compiled=isinstance(decode, CompiledDecode),
            compiled_graphs=decode.graphs_compiled if isinstance(decode, CompiledDecode) else 0,
            lora_dtype=str(base.lora_dtype).removeprefix("torch."),
            lora_kernel=settings.lora_kernel,
            cuda_graphs=isinstance(decode, GraphDecode),
            cuda_graphs_captured=decode.captured if isinstance(decode, GraphDecode) else 0,
            engine_process=settings.engine_process,
        )


def token_texts(tokenizer, decode: Callable[[list[int]], str], ids: list[int]) -> list[str]:
    """Each token's own text: the token turned into text alone (a SentencePiece token keeps its
    leading space, which decoding it alone would drop)."""
    try:
        return [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(ids)]
    except Exception:  # noqa: BLE001 - a tokenizer without the conversion: decode each token
        return [decode([i]) for i in ids]


class Mailbox:
    """Events from the engine thread to a front door's event loop, with one wake-up per burst.

    A decode step emits one event per row; waking the loop for each (a pipe write, a GIL
    hand-over) costs the engine's step more than the events themselves. Events posted while
    a delivery is pending ride along with it, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Event]] = []

    def post(self, queue: asyncio.Queue, event: Event) -> None:  # any thread
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:
                return  # a delivery is scheduled already
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    def _deliver(self) -> None:  # the loop's thread
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)
