"""The engine: the only code that touches the model and the accelerator.

`Engine` wires the parts together and is what the gRPC layer calls: it validates and queues
requests (submission), starts and stops the engine thread in order (lifecycle), and hands
adapter administration (adapter_admin.py) and merges (merges.py) to their owners. The engine
thread itself, with the running batch and its passes, is the worker (worker.py); the
scheduler (scheduler.py) owns the waiting requests and the admission policy.
Other threads (the gRPC layer's pools, I/O workers) read adapter files and register
adapters. Adapters are placed in slots on the engine thread only, between passes; an unload
frees an idle adapter's slot at once from the caller's thread (a slot in use is freed when
its rows finish).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from loramux.server.adapters.cache import Tier, TieredAdapterCache
from loramux.server.adapters.objects import ObjectStores
from loramux.server.adapters.registry import AdapterRecord, AdapterRegistry
from loramux.server.adapters.sources import ANYWHERE, SourceAllowance
from loramux.server.model.base_model import BaseModel
from loramux.server.cpu_threads import limit_to_one_thread
from loramux.server.engine.adapter_admin import AdapterAdmin
from loramux.server.engine.inputs import MAX_COMPLETIONS, PROMPT_LOGPROBS_BYTES, GenerateInput, prompt_ids, request_context, sampling_params
from loramux.server.engine.merges import Merges
from loramux.server.engine.registry_sync import RegistrySync
from loramux.server.engine.request_telemetry import request_ended
from loramux.server.engine.structured import COMPILE_TIMEOUT_S, Grammars
from loramux.server.engine.request import ErrorEvent, Event, FinishEvent, GenerationRequest, PromptEvent, TokenEvent
from loramux.server.engine.worker import IDLE_POLL_S, EngineStats, Worker
from loramux.server.errors import DeadlineExceeded, InvalidRequest, LoramuxError, ShuttingDown
from loramux.server.merging.merge import MERGE_RESULTS
from loramux.server.store.operations import OperationStore
from loramux.server.tenancy.quotas import UNLIMITED, Quotas, RequestUsage
from loramux.server.store.registrations import open_registrations
from loramux.server.settings import Settings
from loramux.server.store.state import StateStore
from loramux.server.telemetry.signals import Telemetry

log = logging.getLogger(__name__)
T = TypeVar("T")
_CUT_WAIT_S = 5.0  # after the grace period: how long the cut rows may take to be answered
__all__ = ["Engine", "EngineStats"]


class OpenTenancy:
    """Every tenant unlimited, adapters from anywhere the server allows (engines built without
    a keys file: tests, benchmarks)."""

    def quotas(self, tenant: str) -> Quotas:
        return UNLIMITED

    def sources(self, tenant: str) -> SourceAllowance:
        return ANYWHERE

    def tenant_label(self, tenant: str) -> str:
        return tenant


class Engine:
    def __init__(self, settings: Settings, base: BaseModel, telemetry: Telemetry | None = None, tenancy=None):
        """`tenancy`: each tenant's quotas, source allowance and metric label (the server's
        Authenticator, from the keys file; OpenTenancy by default)."""
        tenancy = tenancy or OpenTenancy()
        self.settings = settings
        self.base = base
        self.telemetry = telemetry or Telemetry()
        self.telemetry.tenant_label = tenancy.tenant_label
        self.quotas: Callable[[str], Quotas] = tenancy.quotas  # per-tenant limits (reloaded with the keys file)
        self.sources: Callable[[str], SourceAllowance] = tenancy.sources  # where a tenant's adapters may come from
        view = base.view(settings)
        self.budget = view.budget  # every size limit on adapters, computed once
        self.adapter_memory_bytes = self.budget.accelerator_bytes
        self.state = StateStore(settings.state_dir, settings.replica_id) if settings.state_dir is not None else None
        self.objects = (ObjectStores(settings, self.budget.max_download_bytes)
                        if settings.object_roots or settings.registry else None)
        self.registry = AdapterRegistry(
            settings,
            view,
            lambda reload: TieredAdapterCache(
                base.bank,
                settings.host_cache_bytes,
                reload,
                host_pin_memory=base.device.type == "cuda",
                accelerator_capacity_bytes=self.adapter_memory_bytes,
            ),
            store=open_registrations(settings, self.state, self.objects),
            objects=self.objects,
            allowance=self.sources,
        )
        self.registry.on_read = self.telemetry.adapter_read
        self.cache = self.registry.cache
        self.cache.on_event = self.telemetry.cache_event
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="loramux-io", initializer=limit_to_one_thread)
        self.worker = Worker(settings, base, self.registry, self._io)
        self.operations = OperationStore(self.state, MERGE_RESULTS)
        worker = self.worker
        self.adapters = AdapterAdmin(
            settings,
            self.registry,
            self.budget,
            self.call_on_engine,
            retry_hint=lambda: worker.scheduler.retry_hint_s,
            refusal=lambda: ShuttingDown("the server is shutting down") if worker.draining else None,
            cut=lambda: worker.cut,
            quotas=self.quotas,
            sources=self.sources,
        )
        self.merges = Merges(settings, base, self.registry, self.operations, self.telemetry, quotas=self.quotas,
                             register=self.adapters.load)
        self.restore_report = None  # what start-up brought back from the state directory (engine/startup.py)
        self.sync = RegistrySync(self)  # follows the shared registrations (started after the restore)
        self.usage = RequestUsage()
        self._grammars: Grammars | None = None  # structured output (made at start, or at first use)
        self._grammars_lock = threading.Lock()
        self.telemetry.observe(self.stats, self.cache.usage, self.cache.pinned_count, self.kv_usage)
        self.telemetry.observe_lora(self.worker.adapters_in_use, settings.adapter_slots, self.adapter_memory_bytes)

    @property
    def kv_pool(self):
        """The static KV cache (kv_cache.StaticKvPool), or None with the dynamic one."""
        return self.worker.kv_pool

    @property
    def compiled_decode(self):
        """The decode step when it is not eager: compiled_step.CompiledDecode (--compile) or
        graph_step.GraphDecode (--cuda-graphs); None: eager."""
        return self.worker.decode

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Engine:
        self.worker.start()
        self.grammars()  # the tokenizer's structured-output state is built in the background from now
        return self

    def grammars(self) -> Grammars:
        with self._grammars_lock:
            if self._grammars is None:
                base = self.base
                self._grammars = Grammars(base.tokenizer, base.vocab_size, base.eos_token_ids)
            return self._grammars

    def drain(self, grace_s: float) -> bool:
        """Shut down step one: refuse new work, let what is queued or running finish for up to
        `grace_s`, then end what is left with SHUTTING_DOWN (merges too). True if all finished."""
        self.merges.draining = True
        self.worker.refuse_new()
        finished = self._wait_idle(grace_s)
        if not finished:
            cut = ShuttingDown("the server is shutting down and its grace period ended")
            self.worker.end_everything(cut)
            self.operations.cancel_running(cut)
            self._wait_idle(_CUT_WAIT_S)
        return finished

    def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        worker = self.worker
        with worker.cond:
            while worker.busy() or self.operations.running():
                left = deadline - time.monotonic()
                if left <= 0 or not worker.alive():
                    return False
                worker.cond.wait(min(left, IDLE_POLL_S))
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the running rows, fail what waits with SHUTTING_DOWN, stop the worker."""
        waiting, jobs = self.worker.stop()
        for request in waiting:
            request.emit(ErrorEvent(ShuttingDown("the server is shutting down")))
        for future in jobs:
            future.set_exception(ShuttingDown("the server is shutting down"))
        self.worker.join(timeout)
        self._io.shutdown(wait=False, cancel_futures=True)
        self.operations.cancel_running(ShuttingDown("the server is shutting down"))
        self.merges.shutdown()
        self.sync.stop()
        with self._grammars_lock:
            if self._grammars is not None:
                self._grammars.close()  # its checking process, if one runs
        if self.state is not None:
            self.state.close()
        if self.objects is not None:
            self.objects.close()
        if not self.worker.alive():
            self.base.bank.drop_all()  # the adapters' accelerator memory goes back with the engine

    def healthy(self, stall_s: float) -> bool:
        """Whether the worker can make progress: alive, and no pass has run longer than `stall_s`."""
        return self.worker.healthy(stall_s)

    # -- generation ---------------------------------------------------------------------

    def submit(
        self,
        tenant: str,
        inp: GenerateInput,
        emit: Callable[[Event], None],
        deadline: float | None = None,
        trace_context: object = None,
        record: AdapterRecord | None = None,
    ) -> GenerationRequest:
        """Validate and queue a request; events arrive through `emit` on the engine thread.
        `trace_context` (an OpenTelemetry context) is the parent of the request's engine spans.
        `record`: the adapter the caller's name resolved to (facade.py resolves it once); else
        it is looked up here."""
        return self.submit_many(tenant, inp, [emit], deadline, trace_context, record)[0]

    def submit_many(
        self,
        tenant: str,
        inp: GenerateInput,
        emits: list[Callable[[Event], None]],
        deadline: float | None = None,
        trace_context: object = None,
        record: AdapterRecord | None = None,
    ) -> list[GenerationRequest]:
        """`len(emits)` completions of one prompt (OpenAI's `n`), checked and tokenized once
        and queued together: admitted in one pass, they share one prefill of the prompt.
        Completion i samples with `seed + i` when a seed is set. Each counts as a request
        in the tenant's quotas; if one cannot be queued, none runs (those queued are
        cancelled) and its error is raised."""
        if self.worker.draining:
            raise ShuttingDown("the server is shutting down")
        if not 1 <= len(emits) <= MAX_COMPLETIONS:
            raise InvalidRequest(f"n must be in 1..{MAX_COMPLETIONS}, got {len(emits)}", field="n",
                                 reason="INVALID_SAMPLING_PARAMETER")
        if record is None and inp.adapter_id:
            record = self.registry.get(tenant, inp.adapter_id)
        ids = prompt_ids(inp, self.base, self.settings, chat_template=record.spec.chat_template if record else None)
        params = sampling_params(inp, self.base, self.settings)
        room = request_context(self.base, self.settings) - len(ids)
        if params.max_new_tokens > room:  # the context length (the model's, or a static KV row's) caps the output
            params = dataclasses.replace(params, max_new_tokens=room)
        if len(ids) + params.max_new_tokens > self.settings.max_batch_tokens:
            raise InvalidRequest(
                f"the prompt ({len(ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceed the "
                f"{self.settings.max_batch_tokens} tokens a batch may hold; ask for fewer tokens",
                field="max_new_tokens",
                reason="REQUEST_TOO_LARGE",
                max_batch_tokens=self.settings.max_batch_tokens,
            )
        width = torch.tensor([], dtype=self.base.dtype).element_size()  # the prompt's scores are held in the model's dtype
        if params.prompt_logprobs is not None and len(ids) * self.base.vocab_size * width > PROMPT_LOGPROBS_BYTES:
            most = PROMPT_LOGPROBS_BYTES // (self.base.vocab_size * width)
            raise InvalidRequest(f"prompt logprobs are computed for prompts of at most {most} tokens with this model's "
                                 f"vocabulary; this prompt has {len(ids)}", field="prompt_logprobs",
                                 reason="PROMPT_TOO_LONG", prompt_tokens=len(ids), max_prompt_tokens=most)
        # The tenant's quotas are taken first: a tenant over them spends no compile time.
        quotas = self.quotas(tenant)
        begun: list[int] = []
        queued: list[GenerationRequest] = []
        try:
            for _ in emits:
                self.usage.begin(tenant, quotas, len(ids) + params.max_new_tokens, self.worker.scheduler.retry_hint_s)
                begun.append(1)
            grammars = [None] * len(emits)
            if inp.constraint is not None:  # compiled (or found compiled) before anything is queued
                wait = COMPILE_TIMEOUT_S if deadline is None else max(0.0, min(COMPILE_TIMEOUT_S, deadline - time.monotonic()))
                try:
                    grammars = [self.grammars().matcher(inp.constraint, wait, tenant) for _ in emits]  # compiled once, then cached
                except InvalidRequest as e:
                    if e.reason == "GRAMMAR_TOO_COMPLEX" and wait < COMPILE_TIMEOUT_S:  # the caller's deadline cut it short
                        raise DeadlineExceeded("the deadline passed while the structured output was being compiled") from None
                    raise
            if deadline is not None and time.monotonic() > deadline:  # tokenizing took the caller's time
                raise DeadlineExceeded("the deadline passed while the prompt was being tokenized")
            group = object() if len(emits) > 1 else None
            requests = [self._request(tenant, inp, ids, params if params.seed is None or i == 0
                                      else dataclasses.replace(params, seed=(params.seed + i) % (1 << 64)),
                                      emit, deadline, trace_context, record, grammar, group, counts_prompt=i == 0)
                        for i, (emit, grammar) in enumerate(zip(emits, grammars))]
            self.worker.enqueue(requests, quotas.queued)  # all or none
            queued.extend(requests)
        except BaseException:
            for _ in range(len(begun) - len(queued)):  # those queued end their quota with their cancellation
                self.usage.end(tenant)
            for request in queued:  # all or none: the engine ends them at its next pass
                self.cancel(request)
            raise
        if record is not None:
            self.telemetry.adapter_lookup(requests[0].timeline.tier_found)
        return requests

    def _request(self, tenant: str, inp: GenerateInput, ids: list[int], params, emit, deadline, trace_context, record,
                 grammar, group, counts_prompt: bool = True) -> GenerationRequest:
        telemetry, usage = self.telemetry, self.usage

        def emit_last_after_telemetry(event: Event) -> None:
            if isinstance(event, (FinishEvent, ErrorEvent)):  # the request's last event
                usage.end(tenant)  # the request leaves the tenant's quota of requests in flight
                request_ended(telemetry, request, event)
            emit(event)

        request = GenerationRequest(
            tenant=tenant,
            adapter_uid=record.uid if record else None,
            adapter_id=inp.adapter_id,
            prompt_ids=ids,
            params=params,
            emit=emit_last_after_telemetry,
            deadline=deadline,
            trace_context=trace_context,
            grammar=grammar,
            group=group,
            model=inp.adapter_id or self.settings.public_model_name,
            operation="chat" if inp.messages else "text_completion",
            counts_prompt=counts_prompt,
        )
        if record is not None:
            request.timeline.tier_found = self.cache.tier(record.uid)
        return request

    def kv_usage(self) -> float:
        """The KV cache's share in use, 0 to 1: a static cache's rows taken, or the running
        batch's padded positions (rows x width) over --max-batch-tokens."""
        stats = self.worker.stats()
        if self.kv_pool is not None:
            return stats.running / max(1, self.settings.max_batch_size)
        return min(1.0, stats.running * stats.kv_length / max(1, self.settings.max_batch_tokens))

    def stats(self) -> EngineStats:
        return self.worker.stats()

    def cancel(self, request: GenerationRequest) -> None:
        request.cancelled = True
        self.worker.wake()

    def generate(self, tenant: str, inp: GenerateInput, timeout: float | None = None) -> dict:
        """Run one request to the end from any thread but the engine's; returns its collected output."""
        events: queue.Queue[Event] = queue.Queue()
        deadline = time.monotonic() + timeout if timeout else None
        self.submit(tenant, inp, events.put, deadline)
        token_ids: list[int] = []
        logprobs: list[float] = []
        text = []
        prompt = None
        while True:
            event = events.get()
            if isinstance(event, ErrorEvent):
                raise event.error
            if isinstance(event, PromptEvent):
                prompt = event
                continue
            text.append(event.text)
            if isinstance(event, TokenEvent):
                token_ids += event.token_ids
                logprobs += event.logprobs
            else:
                return {"text": "".join(text), "token_ids": token_ids, "logprobs": logprobs, "finish": event,
                        "prompt": prompt}

    # -- adapters (AdapterAdmin does the work) -------------------------------------------

    def load_adapter(self, tenant: str, adapter_id: str, source: str, revision: str = "", pin: bool = False,
                     warm: bool = False, replace: bool = False, wait_s: float | None = None) -> AdapterRecord:
        """Register an adapter, with warm or pin also placed now (see AdapterAdmin.load)."""
        return self.adapters.load(tenant, adapter_id, source, revision, pin, warm, replace, wait_s)

    def unload_adapter(self, tenant: str, adapter_id: str) -> None:
        self.registry.unload(tenant, adapter_id)

    def find_adapter(self, tenant: str, adapter_id: str) -> AdapterRecord:
        """This replica's record of a registered adapter, read now if it was registered on
        another replica and not yet here (blocking)."""
        return self.registry.find(tenant, adapter_id)

    def list_adapters(self, tenant: str) -> list[AdapterRecord]:
        """The tenant's adapters; with a shared store, those registered elsewhere and not yet
        read here are read first (one that cannot be read is left out, and logged)."""
        if self.registry.shared:
            for saved in self.registry.registered(tenant):
                if not self.registry.has(tenant, saved.adapter_id):
                    try:
                        self.registry.find(tenant, saved.adapter_id)
                    except LoramuxError as e:
                        log.warning("adapter %r of tenant %r not listed: %s", saved.adapter_id, tenant, e.reason)
        return self.registry.list(tenant)

    def skipped_records(self) -> list[tuple[str, str]]:
        """Stored records (registrations, operations, heartbeats) skipped as malformed,
        oversized, special files or misplaced, and why."""
        return self.registry.skipped() + (self.state.skipped.items() if self.state is not None else [])

    def tier(self, record: AdapterRecord) -> Tier:
        return self.registry.tier(record)

    def call_on_engine(self, fn: Callable[[], T]) -> Future:
        """Run `fn` on the engine thread between passes."""
        return self.worker.call(fn)
