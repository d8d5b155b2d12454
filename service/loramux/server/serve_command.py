"""`loramux serve`: its flags, made from `Settings` itself, and running it.

Every Settings field is a flag named after it (`max_batch_size` -> `--max-batch-size`), with
the field's default, its type and its docstring as help: a new setting is one edit, in
settings.py. The exceptions are written here once: fields given as repeated flags
(`--adapter-root`), a comma-separated list (`--target-modules`), and the telemetry fields
that fall back to OpenTelemetry's standard environment variables (`--otel-*`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import sys
from pathlib import Path

from loramux.server import settings as settings_module
from loramux.server.errors import InvalidSettings
from loramux.server.settings import CHOICES, Settings

# Fields given as a repeatable flag of another name: field -> flag.
REPEATED = {"adapter_roots": "--adapter-root", "object_roots": "--object-root"}
# Telemetry fields whose flag falls back to an OpenTelemetry variable: field -> (flag, variable).
OTEL = {
    "service_name": ("--otel-service-name", "OTEL_SERVICE_NAME"),
    "traces_exporters": ("--otel-traces-exporter", "OTEL_TRACES_EXPORTER"),
    "metrics_exporters": ("--otel-metrics-exporter", "OTEL_METRICS_EXPORTER"),
    "otlp_protocol": ("--otel-exporter-otlp-protocol", "OTEL_EXPORTER_OTLP_PROTOCOL"),
    "otlp_endpoint": ("--otel-exporter-otlp-endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT"),
}
_METAVARS = {"Path": "PATH", "float": "N", "int": "N"}


def flag_of(field: str) -> str:
    """The flag that sets a Settings field."""
    return REPEATED.get(field) or OTEL.get(field, (None,))[0] or "--" + field.replace("_", "-")


def field_docs() -> dict[str, str]:
    """Each Settings field's docstring (the string literal under it), whitespace collapsed."""
    tree = ast.parse(inspect.getsource(settings_module))
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Settings").body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def build_serve_parser(prog: str = "loramux serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve a base model with LoRA adapters over gRPC.",
        fromfile_prefix_chars="@",  # `@FILE`: more arguments, one per line (the chart's ConfigMap)
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    docs = field_docs()
    otel = parser.add_argument_group("telemetry", "flags left unset fall back to the standard OTEL_* variables")
    for field in dataclasses.fields(Settings):
        name, kind, doc = field.name, str(field.type), docs.get(field.name, "")
        default = None if field.default is dataclasses.MISSING else field.default
        if name in OTEL:
            flag, variable = OTEL[name]
            shown = ",".join(default) if isinstance(default, tuple) else default
            otel.add_argument(flag, dest=name, metavar="LIST" if "tuple" in kind else None, default=None,
                              choices=CHOICES.get(name) if "tuple" not in kind else None,
                              help=f"{doc} (env {variable}; default {shown or 'none'})")
        elif name in REPEATED:
            parser.add_argument(REPEATED[name], dest=name, action="append", default=[], metavar="DIR" if "Path" in kind
                                else "URL", help=f"{doc} (repeatable)")
        elif kind == "bool":
            parser.add_argument(flag_of(name), dest=name, action=argparse.BooleanOptionalAction, default=default, help=doc)
        elif kind.startswith("tuple"):
            parser.add_argument(flag_of(name), dest=name, default=",".join(default), metavar="LIST",
                                help=f"{doc} (comma-separated)")
        else:
            base = kind.split(" |")[0]
            parser.add_argument(flag_of(name), dest=name, required=field.default is dataclasses.MISSING,
                                type={"int": int, "float": float, "Path": Path}.get(base, str), default=default,
                                choices=CHOICES.get(name), metavar=None if name in CHOICES else _METAVARS.get(base),
                                help=doc)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="json: one JSON object per line, with trace_id and span_id inside requests")
    return parser


def serve_settings(args: argparse.Namespace) -> Settings:
    """The validated Settings that `serve`'s parsed flags (and OpenTelemetry's environment
    variables) give; InvalidSettings if they do not hold together."""
    values = {}
    for field in dataclasses.fields(Settings):
        value = getattr(args, field.name)
        kind = str(field.type)
        if field.name in OTEL:
            value = value if value is not None else os.environ.get(OTEL[field.name][1])
            if value is None:
                continue  # the field's own default
        if field.name in REPEATED:
            value = tuple(value)
        elif kind.startswith("tuple"):
            value = tuple(v.strip() for v in value.split(",") if v.strip() and v.strip() != "none")
        values[field.name] = value
    return Settings(**values)


def bad_setting(e: InvalidSettings) -> int:
    """One line naming the flag once (a message that starts with the field's name drops it)."""
    message = e.message.removeprefix(f"{e.field}: ") if e.field else e.message
    print(f"error: {flag_of(e.field)}: {message}" if e.field else f"error: {message}", file=sys.stderr)
    return 2


def run(argv: list[str]) -> int:
    """`loramux serve ARGS`: serve until SIGTERM; 2 with one line for settings that do not hold."""
    args = build_serve_parser().parse_args(argv)  # --help and bad flags answer before torch is imported
    try:
        settings = serve_settings(args)
    except InvalidSettings as e:
        return bad_setting(e)
    import asyncio

    from loramux.server.telemetry.logs import configure_logging, quiet_libraries, quiet_progress_bars

    configure_logging(args.log_level, args.log_format)
    quiet_libraries(args.log_level)  # before torch, transformers and peft are imported
    from loramux.server.app import serve

    quiet_progress_bars()
    try:
        code = asyncio.run(serve(settings, log_format=args.log_format, log_level=args.log_level))
    except InvalidSettings as e:  # found at start-up (a keys file that does not parse, a port in use)
        return bad_setting(e)
    _exit_quietly(code)
    return code


def _exit_quietly(code: int) -> None:
    """After a clean shutdown (telemetry flushed, threads stopped), end the process without the
    interpreter's teardown when Triton was imported (by torchao, or --lora-kernel triton): its
    bindings report "leaked" objects at teardown, dozens of lines that are not this server's."""
    if "triton" not in sys.modules:
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
