"""Run a real loramux server on a loopback port in a background thread, for tests."""

from __future__ import annotations

import asyncio
import threading

from loramux.server.app import RunningServer, create_server
from loramux.server.base_model import load_base_model
from loramux.server.engine.engine import Engine
from loramux.server.settings import Settings


class ServerThread:
    """An engine plus a gRPC server bound to 127.0.0.1:0, on its own event loop thread."""

    def __init__(self, settings: Settings, base=None):
        self.engine = Engine(settings, base or load_base_model(settings)).start()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-grpc", daemon=True)
        self._thread.start()
        self.running: RunningServer = self.run(create_server(self.engine, host="127.0.0.1", port=0))
        self.target = f"127.0.0.1:{self.running.port}"

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=120)

    def stop(self) -> None:
        self.run(self.running.stop(grace=1.0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
