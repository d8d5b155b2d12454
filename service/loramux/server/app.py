"""Build and run the server: load the model, start the engine, serve gRPC.

`create_server` binds and starts a server for an engine (port 0 picks a free port, which
tests use); `serve` is `loramux serve`: it runs until SIGINT/SIGTERM and then drains.
"""

from __future__ import annotations

import asyncio
import json
import dataclasses
import logging
import signal

import grpc
from google.longrunning import operations_pb2
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loramux.server.tenancy.auth import Authenticator
from loramux.server.grpc_api.operations_servicer import OperationsServicer
from loramux.server.front_door.pools import Pools, blocking
from loramux.server.grpc_api.servicer import LoramuxServicer, Malformed
from loramux.server.http_api.routes import HttpFrontDoor
from loramux.server.http_api.server import HttpServer
from loramux.server.http_api.server import bind as bind_http
from loramux.server.cpu_threads import in_own_thread
from loramux.server.engine.engine import Engine
from loramux.server.engine.facade import Facade
from loramux.server.engine.startup import build_engine, settle_garbage_collector
from loramux.server.engine_process.client import EngineProcess
from loramux.server.errors import InvalidSettings
from loramux.server.settings import Settings, check_installed
from loramux.server.telemetry.providers import build_telemetry
from loramux.server.telemetry.signals import Telemetry
from loramux.v1 import loramux_service_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = loramux_service_pb2.DESCRIPTOR.services_by_name["Loramux"].full_name
OPERATIONS_SERVICE = "google.longrunning.Operations"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_MIN_RECEIVE_BYTES = 4 * 1024 * 1024


@dataclasses.dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    engine: Engine | EngineProcess  # the engine, or the handle on its own process (--engine-process)
    health: health.aio.HealthServicer
    servicer: LoramuxServicer
    pools: Pools
    watchdog: asyncio.Task
    health_server: grpc.aio.Server | None = None  # --health-port: grpc.health.v1 alone, in plaintext
    health_port: int | None = None
    http: HttpFrontDoor | None = None  # --http-port: the OpenAI-compatible front door
    http_server: HttpServer | None = None
    stopped: bool = False

    @property
    def http_port(self) -> int | None:
        return self.http_server.port if self.http_server is not None else None

    async def stop(self, grace: float | None = None) -> None:
        """Shut down in order: health says NOT_SERVING and new calls get SHUTTING_DOWN while the
        listener stays open; work in flight finishes for up to `grace` seconds; what is left is
        answered with SHUTTING_DOWN; then the listener closes and the engine stops."""
        if self.stopped:
            return
        self.stopped = True
        grace = self.engine.settings.shutdown_grace_s if grace is None else grace
        self.servicer.draining = True
        if self.http is not None:
            self.http.draining = True
        self.watchdog.cancel()
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        finished = await loop.run_in_executor(None, self.engine.drain, grace)
        if not finished:
            log.warning("shutdown: work still running after %.1fs was ended with SHUTTING_DOWN", grace)
        await self.server.stop(_FINAL_FLUSH_S)  # the last answers go out
        if self.http_server is not None:
            await self.http_server.stop()
        if self.health_server is not None:
            await self.health_server.stop(0)
        await loop.run_in_executor(None, self.engine.stop)
        self.pools.shutdown()
        await loop.run_in_executor(None, self.servicer.auth.close)


_FINAL_FLUSH_S = 2.0
_HEALTH_PERIOD_S = 1.0
_SERVICES = ("", SERVICE_NAME, OPERATIONS_SERVICE)


def _lenient_handlers(service, servicer) -> grpc.GenericRpcHandler:
    """The service's method handlers, with a deserializer that never raises: a body that does
    not parse reaches the servicer as `Malformed`, which answers INVALID_ARGUMENT /
    MALFORMED_REQUEST (gRPC itself would answer INTERNAL)."""
    handlers = {}
    for method in service.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)

        def parse(data: bytes, cls=request_cls):
            try:
                return cls.FromString(data)
            except DecodeError as e:
                return Malformed(cls.DESCRIPTOR.full_name, str(e))

        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name), request_deserializer=parse, response_serializer=response_cls.SerializeToString
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


async def _watch_health(engine: Engine | EngineProcess, health_servicer: health.aio.HealthServicer) -> None:
    """NOT_SERVING while the engine cannot make progress (its thread died, or one pass has run
    longer than engine_stall_s); SERVING again once it does."""
    serving = True
    while True:
        await asyncio.sleep(_HEALTH_PERIOD_S)
        ok = engine.healthy(engine.settings.engine_stall_s)
        if ok != serving:
            serving = ok
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            log.warning("engine %s: health %s", "recovered" if ok else "cannot make progress", "SERVING" if ok else "NOT_SERVING")
            for service in _SERVICES:
                await health_servicer.set(service, status)


async def create_server(
    engine: Engine | EngineProcess, host: str | None = None, port: int | None = None, auth: Authenticator | None = None
) -> RunningServer:
    """`auth`: the credential checks (default: built from the settings; a bad keys file raises)."""
    settings = engine.settings
    interceptors = []
    if engine.telemetry.tracing:  # every RPC but health checks gets a server span
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        interceptors.append(
            aio_server_interceptor(
                tracer_provider=engine.telemetry.tracer_provider, filter_=filters.negate(filters.health_check())
            )
        )
    # A request holds at most the prompt text (bounded) or ids, stop strings and small fields.
    max_receive = max(_MIN_RECEIVE_BYTES, 2 * settings.max_prompt_bytes + _MIN_RECEIVE_BYTES)
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_receive),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            *connection_age_options(settings),
            *EXCLUSIVE_PORT,
        ],
    )
    pools = Pools()
    auth = auth or Authenticator(settings)
    servicer = LoramuxServicer(engine.facade if isinstance(engine, EngineProcess) else Facade(engine), pools, auth)
    server.add_generic_rpc_handlers((
        _lenient_handlers(loramux_service_pb2.DESCRIPTOR.services_by_name["Loramux"], servicer),
        _lenient_handlers(operations_pb2.DESCRIPTOR.services_by_name["Operations"], OperationsServicer(servicer.facade, servicer)),
    ))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, OPERATIONS_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{host or settings.host}:{settings.port if port is None else port}"
    try:
        bound = _bind(server, address, "port", tls_credentials(settings))
    except BaseException:
        pools.shutdown()
        raise
    await server.start()
    health_server, health_port = None, None
    if settings.health_port is not None:  # probes that cannot speak TLS (kubelet's native gRPC probe)
        health_server = grpc.aio.server(options=EXCLUSIVE_PORT)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        try:
            health_port = _bind(health_server, f"{host or settings.host}:{settings.health_port}", "health_port")
        except InvalidSettings:
            await server.stop(0)
            pools.shutdown()
            raise
        await health_server.start()
    http, http_server = None, None
    if settings.http_port is not None:
        http = HttpFrontDoor(servicer.facade, auth, blocking, pools, max_receive, settings.default_max_new_tokens)
        try:
            sock = bind_http(host or settings.host, settings.http_port)
            http_server = HttpServer(http.app, sock, settings.tls_cert, settings.tls_key, settings.tls_client_ca)
            await http_server.start()
        except BaseException:
            await server.stop(0)
            if health_server is not None:
                await health_server.stop(0)
            pools.shutdown()
            raise
        log.info("OpenAI-compatible HTTP API on %s:%d", host or settings.host, http_server.port)
    for service in _SERVICES:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    watchdog = asyncio.get_running_loop().create_task(_watch_health(engine, health_servicer))
    log.info("loramux serving %s on %s:%d", settings.public_model_name, host or settings.host, bound)
    return RunningServer(
        server=server, port=bound, engine=engine, health=health_servicer, servicer=servicer, pools=pools, watchdog=watchdog,
        health_server=health_server, health_port=health_port, http=http, http_server=http_server,
    )


# gRPC shares a port with any other process that asks to (SO_REUSEPORT) by default: a second
# server started on a port in use would take part of its connections, and their API keys.
EXCLUSIVE_PORT = [("grpc.so_reuseport", 0)]


def _bind(server: grpc.aio.Server, address: str, field: str, credentials=None) -> int:
    """Bind `address` (TLS with `credentials`), or InvalidSettings naming the flag's field."""
    try:
        bound = server.add_secure_port(address, credentials) if credentials is not None else server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises "Failed to bind" for a port in use (and for a bad address)
        bound = 0
    if bound == 0:
        raise InvalidSettings(f"cannot listen on {address}: the port is in use by another process, or the address is not "
                              "this host's", field=field)
    return bound


def probe_port(host: str, port: int | None, field: str) -> None:
    """InvalidSettings naming `field` if `port` cannot be bound now: checked before the model
    loads, so that a port in use costs no minutes of loading (binding checks again)."""
    if not port:
        return
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise InvalidSettings(f"cannot listen on {host}:{port} ({e.strerror or e})", field=field) from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: a closed server's TIME_WAIT is fine
        try:
            sock.bind(address)
        except OSError:
            raise InvalidSettings(f"cannot listen on {host}:{port}: the port is in use by another process, or the "
                                  "address is not this host's", field=field) from None


def tls_credentials(settings: Settings):
    """The server's TLS credentials (None without TLS), checked first with Python's ssl module
    so that a PEM that does not parse, or a key that is not the certificate's, is an error
    naming the file instead of gRPC's "Failed to bind"."""
    if settings.tls_cert is None:
        return None
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:  # an encrypted key gets an empty passphrase, and fails, instead of a prompt on the terminal
        context.load_cert_chain(settings.tls_cert, settings.tls_key, password=lambda: b"")
    except (ssl.SSLError, OSError) as e:
        raise InvalidSettings(f"{settings.tls_cert.name} and {settings.tls_key.name} are not a PEM certificate chain and "
                              f"its unencrypted private key ({getattr(e, 'reason', None) or e})", field="tls_cert") from None
    if settings.tls_client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(settings.tls_client_ca))
        except (ssl.SSLError, OSError) as e:
            raise InvalidSettings(f"{settings.tls_client_ca.name} is not a PEM CA bundle "
                                  f"({getattr(e, 'reason', None) or e})", field="tls_client_ca") from None
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def connection_age_options(settings: Settings) -> list[tuple[str, int]]:
    """Recycle client connections (so that clients resolve replicas again), with a grace for
    the calls in flight."""
    if not settings.max_connection_age_s:
        return []
    return [("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", _CONNECTION_AGE_GRACE_MS)]


_CONNECTION_AGE_GRACE_MS = 60_000


def build_server_telemetry(settings: Settings, log_level: str = "INFO",
                           log_format: str = "text") -> tuple[Telemetry, EngineProcess | None]:
    """The server's telemetry and, with --engine-process, the engine's process (not started
    yet): the telemetry is then the front doors' process's, and reads the engine's series from
    its process at each scrape."""
    process = EngineProcess(settings, log_level, log_format) if settings.engine_process else None
    telemetry = build_telemetry(settings)
    if process is not None:
        telemetry.serve_engine_series(process.metrics)  # (for the telemetry's life)
    return telemetry, process


def start_engine(settings: Settings, telemetry: Telemetry, auth: Authenticator, process: EngineProcess | None = None,
                 base=None) -> Engine | EngineProcess:
    """The engine, started: in this process, or in `process` (--engine-process)."""
    if process is None:
        return in_own_thread(build_engine, settings, telemetry, base, auth)
    if base is not None:
        raise ValueError("an engine in its own process loads its model itself")
    telemetry.tenant_label = auth.tenant_label  # the calls' metrics label tenants as the engine's do
    process.start(telemetry)
    settle_garbage_collector()  # this process imported torch and transformers too: out of the collector's sight
    return process


async def serve(settings: Settings, ready: asyncio.Event | None = None, log_format: str = "text",
                log_level: str = "INFO") -> int:
    """Serve until SIGINT or SIGTERM (0), or until the engine's own process ends unasked
    (--engine-process: 1). `log_format` json: the stdout announcement is JSON too."""
    check_installed(settings)  # an option whose extra is not installed stops start-up at once
    auth = Authenticator(settings)  # a bad keys file stops start-up before the model loads
    try:
        tls_credentials(settings)  # so does a bad certificate,
        for field in ("port", "health_port", "http_port"):  # or a port in use (checked again when bound)
            probe_port(settings.host, getattr(settings, field), field)
        telemetry, process = build_server_telemetry(settings, log_level, log_format)  # or the metrics port in use
    except BaseException:
        auth.close()
        raise
    if telemetry.metrics_port is not None:
        log.info("metrics at http://%s:%d/metrics", settings.metrics_host, telemetry.metrics_port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    lost: list[bool] = []  # the engine's process ended unasked

    def on_lost() -> None:  # the engine's reader thread
        lost.append(True)
        try:
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:  # the loop has closed: the server is ending anyway
            pass

    if process is not None:
        process.on_lost = on_lost
    try:
        engine = await loop.run_in_executor(None, start_engine, settings, telemetry, auth, process)
    except BaseException:  # a failed or interrupted (Ctrl-C) start: the engine's process ends too
        if process is not None:
            process.abort()
        auth.close()
        telemetry.shutdown()
        raise
    try:
        running = await create_server(engine, auth=auth)
    except BaseException:  # taken meanwhile: leave nothing running behind the error
        await loop.run_in_executor(None, engine.stop)
        auth.close()
        telemetry.shutdown()
        raise
    for sig in (signal.SIGINT, signal.SIGTERM):  # before announcing: a SIGTERM right after drains
        loop.add_signal_handler(sig, stop.set)
    announcement = f"loramux listening on {settings.host}:{running.port}"  # on stdout: scripts wait for it
    if log_format == "json":  # every line JSON
        announcement = json.dumps({"message": announcement, "host": settings.host, "port": running.port,
                                   "http_port": running.http_port})
    print(announcement, flush=True)
    if ready is not None:
        ready.set()
    await stop.wait()
    if lost:  # outside an orchestrator's liveness probe too, a server without its engine does not linger
        log.error("the engine process ended: the server stops (exit code 1)")
    else:
        log.info("shutting down: draining for up to %.1fs", settings.shutdown_grace_s)
    await running.stop()
    telemetry.shutdown()  # flushes spans and metrics still buffered
    return 1 if lost else 0


class BackgroundServer:
    """An engine and gRPC server on their own event-loop thread (the demo and tests use it).

    Binds 127.0.0.1 on a free port unless the settings say otherwise. Without `telemetry` it
    builds its own from the settings and shuts it down on stop."""

    def __init__(
        self, settings: Settings, base=None, host: str = "127.0.0.1", port: int = 0, telemetry: Telemetry | None = None
    ):
        import threading

        self._own_telemetry = telemetry is None
        process = None
        self._unserve = lambda: None  # (the engine's series leave a telemetry the caller keeps)
        if telemetry is None:
            self.telemetry, process = build_server_telemetry(settings)
        else:
            self.telemetry = telemetry
            process = EngineProcess(settings) if settings.engine_process else None
            if process is not None:
                self._unserve = telemetry.serve_engine_series(process.metrics)
        auth = Authenticator(settings)  # one for the restore's source checks and for the calls
        try:
            self.engine = start_engine(settings, self.telemetry, auth, process, base)
        except BaseException:
            auth.close()
            self._release_telemetry()
            raise
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loramux-grpc", daemon=True)
        self._thread.start()
        try:
            self.running: RunningServer = self.run(create_server(self.engine, host=host, port=port, auth=auth))
        except BaseException:  # nothing left running behind the error
            self.engine.stop()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            auth.close()
            self._release_telemetry()
            raise
        self.target = f"{host}:{self.running.port}"

    def _release_telemetry(self) -> None:
        self._unserve()
        if self._own_telemetry:
            self.telemetry.shutdown()

    def run(self, coro, timeout: float = 120):
        """Run a coroutine on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout)

    def stop(self, grace: float = 1.0) -> None:
        self.run(self.running.stop(grace=grace))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._release_telemetry()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
