"""Merges: checking a request, running it on the merge thread, its spans and its operation.

The merge streams the base's checkpoint files (base_files.py; never the served weights)
through the adapter's files on the CPU, on a single-threaded merge thread, so it runs
beside generation without touching slots or the accelerator. A cancel (CancelOperation, or
shutdown past its grace) stops it at the next tensor and leaves nothing behind. Merges to one output directory are
counted (`_claims`): without overwrite a second is refused while the first is queued or
running; with it they run one after another on the single merge thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from opentelemetry.trace import StatusCode

from loramux.server.adapters.registry import AdapterRecord, AdapterRegistry, validate_adapter_id
from loramux.server.names import refuse_model_name
from loramux.server.adapters.sources import MERGED_PREFIX
from loramux.server.model.base_model import BaseModel
from loramux.server.cpu_threads import limit_to_one_thread
from loramux.server.engine.failures import as_domain_error
from loramux.server.merging.base_files import BaseCheckpoint, read_base_checkpoint
from loramux.server.merging.combine import combine, combined_config
from loramux.server.errors import (
    AdapterExists, InvalidRequest, MergeDiskFull, MergeFailed, MergeOutputExists, ShuttingDown,
)
from loramux.server.merging.merge import (
    MAX_OUTPUT_DEPTH, MERGE_INFO_FILE, MergeJob, MergeProgress, MergeResult, adapter_directory, combined_weights,
    merge_to_checkpoint, outputs_kept, read_adapter_config, resolve_output, verify_merged, write_adapter_checkpoint,
)
from loramux.server.store.operations import Operation, OperationStore
from loramux.server.tenancy.quotas import UNLIMITED, Quotas, refuse
from loramux.server.settings import Settings
from loramux.server.telemetry.signals import Telemetry

log = logging.getLogger(__name__)


class Merges:
    def __init__(
        self, settings: Settings, base: BaseModel, registry: AdapterRegistry, operations: OperationStore, telemetry: Telemetry,
        quotas: Callable[[str], Quotas] = lambda tenant: UNLIMITED,
        register: Callable[[str, str, str], object] | None = None,
    ):
        """`register(tenant, adapter_id, source)` registers a written adapter (the engine's
        AdapterAdmin.load: quotas and all)."""
        self.settings = settings
        self._quotas = quotas
        self.base = base
        self.registry = registry
        self.operations = operations
        self.telemetry = telemetry
        self._register = register
        self.draining = False  # set at shutdown: new merges are refused
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-merge", initializer=limit_to_one_thread)
        self._claims: dict[Path, int] = {}  # output directory -> merges queued or running for it
        self._pending: dict[Path, int] = {}  # output directory -> bytes those merges will write, estimated
        self._checkpoint: BaseCheckpoint | None = None  # the base's files, read on the first merge

    def checkpoint(self) -> BaseCheckpoint:
        """The base's safetensors files as the server loaded them (headers read once)."""
        with self._lock:
            if self._checkpoint is None:
                self._checkpoint = read_base_checkpoint(self.base.directory)
            return self._checkpoint

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def start(self, tenant: str, job: MergeJob, trace_context: object = None) -> Operation:
        """Check the request and start merging on the merge thread; returns the operation.

        Everything that can be refused is refused here, before an operation exists. Its spans
        (one per phase) are children of `trace_context`."""
        if self.settings.merge_root is None:
            raise MergeFailed("this server has no merge root (--merge-root); merging is off")
        if self.draining:
            raise ShuttingDown("the server is shutting down")
        job.check()
        ids = [job.adapter_id] if job.combination is None else list(job.inputs)  # an adapter may appear twice
        records = [self.registry.find(tenant, adapter_id) for adapter_id in ids]
        if job.combination is not None:  # ranks and targets that cannot combine are refused now
            config = combined_config([read_adapter_config(r.directory) for r in records], job.combination.method,
                                     job.combination.svd_rank)
            if job.register_as and int(config["r"]) > self.settings.max_lora_rank:
                raise InvalidRequest(
                    f"the combination has rank {config['r']}, above --max-lora-rank {self.settings.max_lora_rank}; it "
                    "could not be registered (lower svd_rank, or write it without register_as)",
                    field="register_as", reason="ADAPTER_RANK_TOO_LARGE",
                )
        if job.register_as:
            validate_adapter_id(job.register_as, "register_as")
            refuse_model_name(job.register_as, self.settings.model_names, "register_as")
            if self.registry.has(tenant, job.register_as) or any(
                s.adapter_id == job.register_as for s in self.registry.registered(tenant)
            ):
                raise AdapterExists(f"adapter {job.register_as!r} is already registered; unload it or choose another "
                                    "register_as", field="register_as", existing_source="")
        shard_bytes = job.max_shard_bytes or (self.settings.merge_shard_mib << 20 if self.settings.merge_shard_mib else None)
        checkpoint = None if job.adapter_only else self.checkpoint()  # MERGE_UNSUPPORTED now
        quotas = self._quotas(tenant)
        limit = quotas.merges
        if limit is not None:
            running = sum(not op.done and op.name.startswith("operations/merge-") for op in self.operations.list(tenant))
            if running >= limit:
                raise refuse(tenant, "merges", limit, running, f"{running} merges queued or running",
                             retry_after_s=1.0)
        # Each tenant writes under its own directory of the merge root: another tenant's
        # outputs cannot be named, read over or replaced.
        tenant_root = self.settings.merge_root / tenant
        tenant_root.mkdir(exist_ok=True)
        target = resolve_output(tenant_root, job.output_dir, job.overwrite)
        _check_placement(tenant_root, target)
        estimate = checkpoint.total_bytes if checkpoint is not None else sum(_files_bytes(r.directory) for r in records)
        with self._lock:  # merges to one output run one after another; without overwrite, only one
            claims = self._claims.get(target, 0)
            if claims and not job.overwrite:
                raise MergeOutputExists(
                    "another merge to this output_dir is queued or running; merge with overwrite (CLI: --overwrite) to replace its output after it",
                    field="output_dir",
                )
            self._check_room(tenant, tenant_root, target, estimate, quotas)
            self._claims[target] = claims + 1
            self._pending[target] = self._pending.get(target, 0) + estimate

        def release() -> None:
            with self._lock:
                self._claims[target] -= 1
                self._pending[target] -= estimate
                if not self._claims[target]:
                    del self._claims[target], self._pending[target]

        try:
            op = self.operations.create(
                tenant,
                "merge",
                {"adapter_id": ",".join(ids), "output_dir": job.output_dir, "phase": "queued", "tensors_done": 0,
                 "tensors_total": len(checkpoint.entries) if checkpoint else 0, "bytes_done": 0,
                 "bytes_total": checkpoint.total_bytes if checkpoint else 0},
            )
        except BaseException:  # the state store could not be written: nothing was started
            release()
            raise
        tracer = self.telemetry.tracer

        def work() -> None:
            try:
                run()
            finally:
                release()

        def run() -> None:
            started = time.perf_counter()
            attributes = {"loramux.tenant": tenant, "loramux.adapter.id": ",".join(ids), "loramux.operation": op.name}
            with tracer.start_as_current_span("loramux.merge", context=trace_context, attributes=attributes) as span:
                try:
                    result = self._merge(op, tenant, job, records, target, checkpoint, shard_bytes)
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
                result = dataclasses.replace(result, output_dir=str(target.relative_to(tenant_root)))
                self.operations.finish(op, result=result)

        try:
            self._executor.submit(work)
        except RuntimeError:  # shut down meanwhile
            release()
            self.operations.finish(op, error=ShuttingDown("the server is shutting down"))
        return op

    def _check_room(self, tenant: str, tenant_root: Path, target: Path, estimate: int, quotas: Quotas) -> None:
        """Refuse a merge that would take the tenant past its merge_outputs or merge_output_gib
        quota (outputs kept plus merges under way, the output it replaces not counted), or leave
        the merge root's disk with less than merge_disk_reserve_mib free once every merge
        under way has written (held: self._lock)."""
        kept = {path: size for path, size in outputs_kept(tenant_root).items() if path != target}
        mine = {path: size for path, size in self._pending.items() if path.is_relative_to(tenant_root) and path != target}
        count = len(kept.keys() | mine.keys()) + 1
        used = sum(kept.values()) + sum(mine.values()) + estimate
        if quotas.merge_outputs is not None and count > quotas.merge_outputs:
            raise refuse(tenant, "merge_outputs", quotas.merge_outputs, count - 1,
                         f"{count - 1} merge outputs kept or being written; delete one (or overwrite it) first")
        if quotas.merge_output_gib is not None and used > quotas.merge_output_gib << 30:
            raise refuse(tenant, "merge_output_gib", quotas.merge_output_gib, (used - estimate) >> 30,
                         f"{(used - estimate) / 2**30:.1f} GiB of merge outputs and this merge needs about "
                         f"{estimate / 2**30:.1f} GiB")
        free = shutil.disk_usage(self.settings.merge_root).free
        reserve = self.settings.merge_disk_reserve_mib << 20
        under_way = sum(self._pending.values())
        if free - under_way - estimate < reserve:
            raise MergeDiskFull(
                f"the merge disk has {free >> 20} MiB free; merges under way will write about {under_way >> 20} MiB and "
                f"this one about {estimate >> 20} MiB, and {self.settings.merge_disk_reserve_mib} MiB stay free; retry "
                "once outputs are removed or merges end",
                retry_after_s=60.0, free_mib=free >> 20, needed_mib=estimate >> 20,
            )

    def _merge(self, op: Operation, tenant: str, job: MergeJob, records: list[AdapterRecord], target: Path,
               checkpoint: BaseCheckpoint | None, shard_bytes: int | None) -> MergeResult:
        """The merge itself, on the merge thread, one child span per phase."""
        tracer = self.telemetry.tracer
        self.operations.update(op, phase="merging")
        with tracer.start_as_current_span("loramux.merge.read_adapter"):
            inputs = [self.registry.read_weights(record, dtype=torch.float32) for record in records]
        provenance = {
            "base_model": self.settings.served_model_name,
            "base_revision": self.base.revision,
            "adapters": [{"adapter_id": r.adapter_id, "source": r.source, "revision": r.revision, "weight": weight}
                         for r, weight in zip(records, job.combination.weights if job.combination else (1.0,))],
            "method": job.combination.method if job.combination is not None else "lora",
            "combination": dataclasses.asdict(job.combination) if job.combination is not None else None,
            "output": "adapter" if job.adapter_only else "model",
            "max_shard_bytes": shard_bytes,
            "verified": job.verify,
            "loramux_version": _version(),
        }
        if job.combination is None:
            weights, config = inputs[0], None
        else:
            with tracer.start_as_current_span("loramux.merge.combine") as combine_span:
                configs = [read_adapter_config(r.directory) for r in records]
                config, factors = combine(inputs, configs, job.combination, self.base.module_order)
                combine_span.set_attribute("loramux.merge.rank", int(config["r"]))
                weights = combined_weights(config, factors)
        if job.adapter_only:
            with tracer.start_as_current_span("loramux.merge.write_adapter"):
                result = write_adapter_checkpoint(config, weights, records[0], target, provenance, job.overwrite,
                                                  replica=self.settings.replica_id)
            if job.register_as:
                self.operations.update(op, phase="registering")
                with tracer.start_as_current_span("loramux.merge.register"):
                    self._register(tenant, job.register_as, f"{MERGED_PREFIX}{job.output_dir}")
            return result
        phase = {"span": tracer.start_span("loramux.merge.merge_tensors")}
        checked = {"at": time.monotonic()}

        def progress(p: MergeProgress) -> None:
            if op.cancel_error is not None:  # CancelOperation, or shutdown past its grace period: stop here
                raise op.cancel_error
            now = time.monotonic()
            if now - checked["at"] >= CANCEL_POLL_S:  # a cancel asked through another replica
                checked["at"] = now
                self.operations.check_cancel_request(op)
            self.operations.update(op, tensors_done=p.tensors_done, tensors_total=p.tensors_total,
                                   bytes_done=p.bytes_done, bytes_total=p.bytes_total)
            if p.tensors_done == p.tensors_total:
                phase["span"].set_attribute("loramux.merge.tensors", p.tensors_total)
                phase["span"].set_attribute("loramux.merge.bytes", p.bytes_total)
                phase["span"].end()
                phase["span"] = tracer.start_span("loramux.merge.write_checkpoint")
                self.operations.update(op, phase="writing_config")

        def verification(directory: Path) -> float:
            phase["span"].end()
            phase["span"] = tracer.start_span("loramux.merge.verify")
            self.operations.update(op, phase="verifying")
            with adapter_directory(config, weights, records[0], directory.parent, self.settings.replica_id) as adapter_dir:
                difference = verify_merged(checkpoint.directory, adapter_dir, directory, self.base.vocab_size)
            phase["span"].set_attribute("loramux.merge.max_logit_difference", difference)
            if op.cancel_error is not None:
                raise op.cancel_error
            return difference

        try:
            result: MergeResult = merge_to_checkpoint(checkpoint, weights, target, provenance, progress,
                                                      shard_bytes=shard_bytes, overwrite=job.overwrite,
                                                      verify=verification if job.verify else None,
                                                      replica=self.settings.replica_id,
                                                      transposed=self.base.bank.stored_transposed())
        except BaseException as e:
            phase["span"].set_status(StatusCode.ERROR, str(e))
            raise
        finally:
            phase["span"].end()
        return result


def _check_placement(tenant_root: Path, target: Path) -> None:
    """An output at most MAX_OUTPUT_DEPTH directories down, never inside another merge's output
    (outputs are counted against the tenant's quotas as the directories holding a merge's info
    file, outside one another)."""
    parts = target.relative_to(tenant_root).parts
    if len(parts) > MAX_OUTPUT_DEPTH:
        raise InvalidRequest(f"output_dir may be at most {MAX_OUTPUT_DEPTH} directories deep", field="output_dir",
                             reason="OUTPUT_DIR_INVALID")
    for depth in range(1, len(parts)):
        if (tenant_root.joinpath(*parts[:depth]) / MERGE_INFO_FILE).exists():
            raise InvalidRequest(f"output_dir lies inside another merge's output ({'/'.join(parts[:depth])}); choose "
                                 "a directory beside it", field="output_dir", reason="OUTPUT_DIR_INVALID")


def _files_bytes(directory: Path) -> int:
    """The bytes of the files directly in `directory` (an adapter's: what an adapter-only
    output of it is about as large as)."""
    try:
        return sum(e.stat().st_size for e in os.scandir(directory) if e.is_file())
    except OSError:
        return 0


CANCEL_POLL_S = 1.0  # how often a running merge looks for a cancel asked through another replica


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loramux")
    except PackageNotFoundError:
        return "unknown"
