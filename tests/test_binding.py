"""A port in use is a start-up error naming it. gRPC lets a second process bind a port already
in use (SO_REUSEPORT) by default: a development server started on a production server's port
took part of its new connections, and their API keys."""

from __future__ import annotations

import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loramux.cli.main import main as cli
from loramux.server.app import BackgroundServer


def _held_port() -> tuple[socket.socket, int]:
    """A port some other process listens on, as a plain socket that asks to share it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def test_a_second_server_on_a_port_in_use_does_not_start(assets, capsys):
    with BackgroundServer(assets.settings()) as first:
        port = first.running.port
        code = cli(["serve", "--model", str(assets.base), "--auth", "none", "--port", str(port),
                    "--adapter-root", str(assets.adapters), "--max-lora-rank", "16"])
        assert code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"error: --port: cannot listen on 127.0.0.1:{port}: the port is in use"), last
        with grpc.insecure_channel(first.target) as channel:  # the first one serves on, alone
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_and_metrics_ports_in_use_are_named(assets, capsys):
    sock, port = _held_port()  # another process that would share the port if asked
    try:
        for flag in ("--health-port", "--metrics-port"):
            code = cli(["serve", "--model", str(assets.base), "--auth", "none", "--port", "0", flag, str(port),
                        "--adapter-root", str(assets.adapters), "--max-lora-rank", "16"])
            last = capsys.readouterr().err.strip().splitlines()[-1]
            assert code == 2 and last.startswith(f"error: {flag}: cannot listen on 127.0.0.1:{port}"), last
    finally:
        sock.close()
