"""Start-up: bring back what the state store kept, and clear what a crash left behind.

Each registration (in `--state-dir`, or the `--registry` object store) is read again from its
source at the revision it resolved to (a Hub commit, or the content hash of local files or
objects, which must still match) and pinned again if it was: the first pass of the registry
sync, run before serving. One that cannot be restored (files gone or changed, a source no
longer allowed) is reported in the log and in the returned report, and kept: the operator
may put the files back. The server starts regardless. This replica's operations, and those
of replicas that stopped, come back as records; those cut short end with
INTERRUPTED_BY_RESTART. Merge temporaries under the merge root are removed.
"""

from __future__ import annotations

import dataclasses
import logging

from loramux.server.merge import sweep_temporaries

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RestoreReport:
    restored: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (tenant, adapter_id)
    failed: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (tenant, adapter_id, reason)
    interrupted_operations: int = 0
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
        report.interrupted_operations = engine.operations.restore(engine.sync.lease_s)
    if engine.registry.shared:
        read, failed = engine.sync.run_once(retry_failed_s=0.0, start_up=True)
        report.restored = [(r.tenant, r.adapter_id) for r in read]
        report.failed = [(saved.tenant, saved.adapter_id, error.reason) for saved, error in failed]
        log.info("restored %d adapter registration(s); %d could not be restored", len(report.restored), len(report.failed))
    engine.sync.start()
    return report
