"""Build and run the server: load the model, start the engine, serve gRPC.

`create_server` binds and starts a server for an engine (port 0 picks a free port, which
tests use); `serve` is `loramux serve`: it runs until SIGINT/SIGTERM and then drains.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal

import grpc
from google.longrunning import operations_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loramux.server.api.operations_servicer import OperationsServicer
from loramux.server.api.servicer import LoramuxServicer
from loramux.server.base_model import load_base_model
from loramux.server.engine.engine import Engine
from loramux.server.settings import Settings
from loramux.server.telemetry.providers import build_telemetry
from loramux.server.telemetry.signals import Telemetry
from loramux.v1 import loramux_service_pb2, loramux_service_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = loramux_service_pb2.DESCRIPTOR.services_by_name["Loramux"].full_name
OPERATIONS_SERVICE = "google.longrunning.Operations"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    engine: Engine
    health: health.aio.HealthServicer

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let calls in flight finish for `grace` seconds, stop the engine."""
        grace = self.engine.settings.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)


async def create_server(engine: Engine, host: str | None = None, port: int | None = None) -> RunningServer:
    settings = engine.settings
    interceptors = []
    if engine.telemetry.tracing:  # every RPC but health checks gets a server span
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        interceptors.append(
            aio_server_interceptor(
                tracer_provider=engine.telemetry.tracer_provider, filter_=filters.negate(filters.health_check())
            )
        )
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    loramux_service_pb2_grpc.add_LoramuxServicer_to_server(LoramuxServicer(engine), server)
    operations_pb2_grpc.add_OperationsServicer_to_server(OperationsServicer(engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, OPERATIONS_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{host or settings.host}:{settings.port if port is None else port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    for service in ("", SERVICE_NAME, OPERATIONS_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("loramux serving %s on %s:%d", settings.served_model_name, host or settings.host, bound)
    return RunningServer(server=server, port=bound, engine=engine, health=health_servicer)


def build_engine(settings: Settings, telemetry: Telemetry) -> Engine:
    return Engine(settings, load_base_model(settings), telemetry).start()


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    telemetry = build_telemetry(settings)
    if telemetry.metrics_port is not None:
        log.info("metrics at http://%s:%d/metrics", settings.metrics_host or settings.host, telemetry.metrics_port)
    engine = await asyncio.get_running_loop().run_in_executor(None, build_engine, settings, telemetry)
    running = await create_server(engine)
    print(f"loramux listening on {settings.host}:{running.port}", flush=True)
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining for up to %.1fs", settings.shutdown_grace_s)
    await running.stop()
    telemetry.shutdown()  # flushes spans and metrics still buffered


class BackgroundServer:
    """An engine and gRPC server on their own event-loop thread (the demo and tests use it).

    Binds 127.0.0.1 on a free port unless the settings say otherwise. Without `telemetry` it
    builds its own from the settings and shuts it down on stop."""

    def __init__(
        self, settings: Settings, base=None, host: str = "127.0.0.1", port: int = 0, telemetry: Telemetry | None = None
    ):
        import threading

        self._own_telemetry = telemetry is None
        self.telemetry = telemetry or build_telemetry(settings)
        self.engine = Engine(settings, base or load_base_model(settings), self.telemetry).start()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loramux-grpc", daemon=True)
        self._thread.start()
        self.running: RunningServer = self.run(create_server(self.engine, host=host, port=port))
        self.target = f"{host}:{self.running.port}"

    def run(self, coro, timeout: float = 120):
        """Run a coroutine on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout)

    def stop(self, grace: float = 1.0) -> None:
        self.run(self.running.stop(grace=grace))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if self._own_telemetry:
            self.telemetry.shutdown()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
