"""Start-up: bring back what the state store kept, and clear what a crash left behind.

Each saved registration is loaded again from its source at the revision it resolved to (a
Hub commit, or the content hash of local files, which must still match) and pinned again if
it was. One that cannot be restored (files gone or changed, a source no longer allowed) is
reported in the log and in the returned report; the server starts regardless. Operations
come back as records; those the restart cut short end with INTERRUPTED_BY_RESTART. Merge
temporaries under the merge root are removed.
"""

from __future__ import annotations

import dataclasses
import logging

from loramux.server.adapters.sources import HUB_PREFIX
from loramux.server.errors import AdapterChanged, LoramuxError
from loramux.server.merge import sweep_temporaries

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RestoreReport:
    restored: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (tenant, adapter_id)
    failed: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (tenant, adapter_id, reason)
    interrupted_operations: int = 0
    swept: int = 0  # merge temporaries removed


def restore_state(engine) -> RestoreReport:
    """Run once the engine has started (pins need its thread) and before serving."""
    report = RestoreReport()
    settings = engine.settings
    if settings.merge_root is not None:
        removed = sweep_temporaries(settings.merge_root)
        report.swept = len(removed)
        if removed:
            log.warning("removed %d merge temporaries left by an interrupted merge", len(removed))
    if engine.state is None:
        return report
    report.interrupted_operations = engine.operations.restore()
    for saved in engine.state.adapters():
        hub = saved.source.startswith(HUB_PREFIX)
        try:
            record = engine.load_adapter(
                saved.tenant, saved.adapter_id, saved.source, revision=saved.revision if hub else "", wait_s=0.0,
                pin=False,
            )
            if record.revision != saved.revision:
                engine.registry.unload(saved.tenant, saved.adapter_id)
                engine.state.put_adapter(saved)  # keep the row: the operator may put the files back
                raise AdapterChanged("the adapter's files changed since it was registered; load it again with replace")
            if saved.pinned:
                engine.load_adapter(saved.tenant, saved.adapter_id, saved.source, revision=saved.revision if hub else "",
                                    pin=True, wait_s=settings.slot_wait_s)
        except LoramuxError as e:
            report.failed.append((saved.tenant, saved.adapter_id, e.reason))
            log.warning("not restored: adapter %r of tenant %r (%s: %s)", saved.adapter_id, saved.tenant, e.reason, e.message)
            continue
        report.restored.append((saved.tenant, saved.adapter_id))
    log.info("restored %d adapter registration(s); %d could not be restored", len(report.restored), len(report.failed))
    return report
