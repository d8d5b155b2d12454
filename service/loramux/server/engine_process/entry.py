"""The engine process's entry point (`--engine-process`): spawned by `client.EngineProcess`,
it quiets the libraries before they are imported, loads the model, starts the engine and
serves it (`host.Host`) until the front doors' process stops it or goes away.

The front doors' process owns the lifecycle: this process ignores SIGINT and SIGTERM (a
terminal's Ctrl-C, or a service manager that signals every process of the server, reach it
too; the front doors' process drains first, then stops it). It ends when told to, or when
the front doors' process is gone (its pipe closes, or the process's sentinel says so).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from loramux.server.settings import Settings


def main(settings: Settings, conn, log_level: str, log_format: str) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    threading.Thread(target=_end_with_parent, name="loramux-engine-orphan", daemon=True).start()
    from loramux.server.telemetry.logs import configure_logging, quiet_libraries, quiet_progress_bars

    configure_logging(log_level, log_format)
    quiet_libraries(log_level)  # before torch, transformers and peft are imported
    quiet_progress_bars()
    from loramux.server.cpu_threads import in_own_thread
    from loramux.server.engine.startup import build_engine
    from loramux.server.engine_process.host import Host
    from loramux.server.errors import InternalError, LoramuxError
    from loramux.server.telemetry.providers import build_telemetry
    from loramux.server.tenancy.auth import Authenticator

    telemetry = build_telemetry(settings, role="engine")
    auth = Authenticator(settings, announce=False)  # the engine's tenancy (quotas, sources, labels), reloaded with the keys file
    try:
        engine = in_own_thread(build_engine, settings, telemetry, None, auth)
    except BaseException as e:  # noqa: BLE001 - reported to the front doors' process, which raises it
        error = e if isinstance(e, LoramuxError) else InternalError.logged(e, "the engine process could not start")
        conn.send(("failed", error))
        telemetry.shutdown()
        auth.close()
        _exit(0)
    report = engine.restore_report
    conn.send(("ready", {"pid": os.getpid(), "model_dir": str(engine.base.directory),
                         "restored": len(report.restored) if report is not None else 0}))
    try:
        Host(engine, conn, telemetry).serve()
    except BaseException:  # noqa: BLE001 - never a process alive but silent: the front doors' side fails what waited
        logging.getLogger(__name__).exception("the engine process failed")
        _exit(1)
    auth.close()
    _exit(0)


def _end_with_parent() -> None:
    """End this process when the front doors' process is gone, whatever this one is doing
    (loading a model for minutes, or serving: its pipe may be held open by a descendant)."""
    from multiprocessing import parent_process
    from multiprocessing.connection import wait

    parent = parent_process()
    if parent is None:
        return
    wait([parent.sentinel])
    logging.getLogger(__name__).warning("the front doors' process is gone: the engine process ends")
    _exit(1)


def _exit(code: int) -> None:
    """End without the interpreter's teardown (Triton's bindings report leaks there), after
    flushing what was written."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
