"""Building a started engine: the model loaded, the worker running, the state directory's
registrations restored. The server's process calls it (`app.py`), and so does an engine
process of its own (`engine_process/host.py`)."""

from __future__ import annotations

import gc

from loramux.server.engine.engine import Engine
from loramux.server.engine.restore import restore_state
from loramux.server.model.base_model import load_base_model
from loramux.server.settings import Settings
from loramux.server.telemetry.signals import Telemetry


def build_engine(settings: Settings, telemetry: Telemetry, base=None, tenancy=None) -> Engine:
    """Load the model, start the engine and restore what the state directory kept (checked
    against the keys file's per-tenant sources: `tenancy` is the server's Authenticator)."""
    engine = Engine(settings, base or load_base_model(settings), telemetry, tenancy=tenancy).start()
    engine.restore_report = restore_state(engine)
    settle_garbage_collector()
    return engine


def settle_garbage_collector() -> None:
    """Move everything start-up made (the model, torch's and transformers' modules: millions of
    objects) out of the collector's sight. A full collection walks every object it tracks while
    holding the interpreter lock: with them in view, a burst of small allocations (a large keys
    file reloaded, a long listing) set one off that stalled every call for 0.4-0.6 s."""
    gc.collect()
    gc.freeze()
