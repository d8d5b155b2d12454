"""Serving the HTTP front door with uvicorn on the server's event loop (beside gRPC).

The listening socket is bound here, without SO_REUSEPORT (a second server on the port is an
error naming `--http-port`, as for the gRPC ports), and handed to uvicorn; port 0 picks a
free port (tests). Stopping drains: the routes answer 503 / SHUTTING_DOWN while the engine
finishes what runs, then uvicorn closes its connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from loramux.server.errors import InvalidSettings

log = logging.getLogger(__name__)
GRACEFUL_S = 2  # at shutdown, connections still open after this (a stream nobody reads) are closed


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise InvalidSettings(f"cannot listen on {host}:{port} ({e.strerror or e})", field="http_port") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise InvalidSettings(f"cannot listen on {host}:{port}: the port is in use by another process, or the address "
                              "is not this host's", field="http_port") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: `loramux serve` owns SIGTERM and SIGINT
    (they drain both front doors in order), and uvicorn would replace and later reset them."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """uvicorn serving `app` on an already bound socket, as a task of the running loop."""

    def __init__(self, app, sock: socket.socket, tls_cert=None, tls_key=None, tls_client_ca=None):
        self.sock = sock
        self.port = sock.getsockname()[1]
        # uvicorn's own lines ("Started server process", ...) say what loramux's already do: its
        # warnings and errors still show; the access log is loramux's (routes.py).
        logging.getLogger("uvicorn.error").setLevel(max(logging.WARNING, logging.getLogger("uvicorn.error").level))
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, server_header=False,
                                timeout_keep_alive=30, ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                                ssl_ca_certs=tls_client_ca, ssl_cert_reqs=2 if tls_client_ca else 0,
                                h11_max_incomplete_event_size=64 * 1024,
                                timeout_graceful_shutdown=GRACEFUL_S)
        self._server = _Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self.sock]))
        while not self._server.started:
            if self._task.done():  # it failed before it could serve
                self._task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self.sock.close()
