"""Start-up: bring back what the state store kept, and clear what a crash left behind.

Start-up reads only what must be in place before the first call: the registrations pinned
in the store (in `--state-dir`, or the `--registry` object store), read again from their
source at the revision each resolved to (a Hub commit, or the content hash of local files or
objects, which must still match) and pinned again. Every other registration is read on the
first request that names it (serving starts in about the same time with 10 registrations or
10,000). One that cannot be restored (files gone or changed, a source no longer allowed) is
reported in the log and in the returned report, and kept: the operator may put the files
back. A stored record that is not one this server writes (malformed, oversized, a FIFO, a
link, in another tenant's folder) is skipped and listed in the report. The server starts
regardless. This replica's operations, and those of replicas that stopped, come back as
records; those cut short end with INTERRUPTED_BY_RESTART; finished ones past their
retention are removed. Merge temporaries under the merge root are removed.
"""

from __future__ import annotations

import dataclasses
import logging

from loramux.server.merging.merge import sweep_temporaries

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RestoreReport:
    restored: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (tenant, adapter_id)
    failed: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (tenant, adapter_id, reason)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (stored file or object, why)
    interrupted_operations: int = 0
    expired_operations: int = 0
    swept: int = 0  # merge temporaries removed


def restore_state(engine) -> RestoreReport:
    """Run once the engine has started (pins need its thread) and before serving; then the
    registry sync follows the store in the background."""
    report = RestoreReport()
    settings = engine.settings
    if settings.merge_root is not None:
        state, lease = engine.state, engine.sync.lease_s

        def ours(replica: str | None) -> bool:  # with a shared merge root, others' merges may be running
            return replica is None or replica == settings.replica_id or (state is not None and state.stopped(replica, lease))

        removed = sweep_temporaries(settings.merge_root, ours)
        report.swept = len(removed)
        if removed:
            log.warning("removed %d merge temporaries left by an interrupted merge", len(removed))
    if engine.state is not None:
        engine.state.heartbeat()
        report.expired_operations = engine.operations.expire(settings.operation_retention_s)
        report.interrupted_operations = engine.operations.restore(engine.sync.lease_s)
    if engine.registry.shared:
        read, failed = engine.sync.run_once(retry_failed_s=0.0, start_up=True)
        report.restored = [(r.tenant, r.adapter_id) for r in read]
        report.failed = [(saved.tenant, saved.adapter_id, error.reason) for saved, error in failed]
        log.info("restored %d pinned adapter registration(s); %d could not be restored; the others are read on first "
                 "use", len(report.restored), len(report.failed))
    report.skipped = engine.skipped_records()
    if report.skipped:
        log.warning("skipped %d stored record(s) that this server did not write as they are (see the warnings above)",
                    len(report.skipped))
    engine.sync.start()
    return report
