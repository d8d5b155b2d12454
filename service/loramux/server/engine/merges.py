"""Merges: checking a request, running it on the merge thread, its spans and its operation.

The merge reads the base weights (never changed while serving) and the adapter's files, so
it runs beside generation without touching slots. Merges to one output directory are
counted (`_claims`): without overwrite a second is refused while the first is queued or
running; with it they run one after another on the single merge thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from opentelemetry.trace import StatusCode

from loramux.server.adapters.registry import AdapterRecord, AdapterRegistry
from loramux.server.base_model import BaseModel
from loramux.server.cpu_threads import limit_to_one_thread
from loramux.server.engine.failures import as_domain_error
from loramux.server.errors import MergeFailed, MergeOutputExists, ShuttingDown
from loramux.server.merge import MergeResult, merge_to_checkpoint, resolve_output
from loramux.server.operations import Operation, OperationStore
from loramux.server.quotas import UNLIMITED, Quotas, refuse
from loramux.server.settings import Settings
from loramux.server.telemetry.signals import Telemetry

log = logging.getLogger(__name__)


class Merges:
    def __init__(
        self, settings: Settings, base: BaseModel, registry: AdapterRegistry, operations: OperationStore, telemetry: Telemetry,
        quotas: Callable[[str], Quotas] = lambda tenant: UNLIMITED,
    ):
        self.settings = settings
        self._quotas = quotas
        self.base = base
        self.registry = registry
        self.operations = operations
        self.telemetry = telemetry
        self.draining = False  # set at shutdown: new merges are refused
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-merge", initializer=limit_to_one_thread)
        self._claims: dict[Path, int] = {}  # output directory -> merges queued or running for it

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def start(
        self, tenant: str, adapter_id: str, output_dir: str, overwrite: bool = False, trace_context: object = None
    ) -> Operation:
        """Check the request and start merging on the merge thread; returns the operation.

        The merge reads the base weights (never changed while serving) and the adapter's files,
        so it runs beside generation without touching slots. Its spans (one per phase) are
        children of `trace_context`."""
        if self.settings.merge_root is None:
            raise MergeFailed("this server has no merge root (--merge-root); merging is off")
        if self.draining:
            raise ShuttingDown("the server is shutting down")
        record = self.registry.find(tenant, adapter_id)
        limit = self._quotas(tenant).merges
        if limit is not None:
            running = sum(not op.done and op.name.startswith("operations/merge-") for op in self.operations.list(tenant))
            if running >= limit:
                raise refuse(tenant, "merges", limit, running, f"{running} merges queued or running",
                             retry_after_s=1.0)
        # Each tenant writes under its own directory of the merge root: another tenant's
        # outputs cannot be named, read over or replaced.
        tenant_root = self.settings.merge_root / tenant
        tenant_root.mkdir(exist_ok=True)
        target = resolve_output(tenant_root, output_dir, overwrite)
        with self._lock:  # merges to one output run one after another; without overwrite, only one
            claims = self._claims.get(target, 0)
            if claims and not overwrite:
                raise MergeOutputExists(
                    "another merge to this output_dir is queued or running; set overwrite to replace its output after it",
                    field="output_dir",
                )
            self._claims[target] = claims + 1
        op = self.operations.create(
            tenant,
            "merge",
            {"adapter_id": adapter_id, "output_dir": output_dir, "phase": "queued", "tensors_done": 0, "tensors_total": 0},
        )
        tracer = self.telemetry.tracer

        def work() -> None:
            try:
                run()
            finally:
                with self._lock:
                    self._claims[target] -= 1
                    if not self._claims[target]:
                        del self._claims[target]

        def run() -> None:
            started = time.perf_counter()
            attributes = {"loramux.tenant": tenant, "loramux.adapter.id": adapter_id, "loramux.operation": op.name}
            with tracer.start_as_current_span("loramux.merge", context=trace_context, attributes=attributes) as span:
                try:
                    result = self._merge(op, record, adapter_id, target, overwrite)
                except BaseException as e:
                    error = as_domain_error(e, f"merge {op.name} failed")
                    span.set_status(StatusCode.ERROR, error.message)
                    span.set_attribute("error.type", error.reason)
                    # Metrics first: whoever waits on the operation may read them at once.
                    self.telemetry.merge_duration.record(time.perf_counter() - started, {"outcome": "error"})
                    self.operations.finish(op, error=error)
                    return
                self.telemetry.merge_duration.record(time.perf_counter() - started, {"outcome": "ok"})
                self.operations.update(op, phase="done")
                self.operations.finish(op, result=result)

        self._executor.submit(work)
        return op

    def _merge(self, op: Operation, record: AdapterRecord, adapter_id: str, target, overwrite: bool) -> MergeResult:
        """The merge itself, on the merge thread, one child span per phase."""
        tracer = self.telemetry.tracer
        self.operations.update(op, phase="merging")
        with tracer.start_as_current_span("loramux.merge.read_adapter"):
            weights = self.registry.read_weights(record, dtype=torch.float32)
        provenance = {
            "base_model": self.settings.served_model_name,
            "base_revision": self.base.revision,
            "adapter_id": adapter_id,
            "adapter_source": record.source,
            "adapter_revision": record.revision,
        }
        phase = {"span": tracer.start_span("loramux.merge.merge_tensors")}

        def progress(done: int, total: int) -> None:
            if op.cancel_error is not None:  # shutdown past its grace period: stop here, clean up
                raise op.cancel_error
            self.operations.update(op, tensors_done=done, tensors_total=total)
            if done == total:
                phase["span"].set_attribute("loramux.merge.tensors", total)
                phase["span"].end()
                phase["span"] = tracer.start_span("loramux.merge.write_checkpoint")
                self.operations.update(op, phase="writing_config")

        try:
            result: MergeResult = merge_to_checkpoint(self.base, weights, target, provenance, progress, overwrite=overwrite)
        except BaseException as e:
            phase["span"].set_status(StatusCode.ERROR, str(e))
            raise
        finally:
            phase["span"].end()
        return result

