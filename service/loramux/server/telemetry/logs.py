"""Log records as JSON lines carrying the trace and span ids of the current span."""

from __future__ import annotations

import json
import logging
import time

from opentelemetry import trace

# Standard LogRecord attributes; anything else on a record (logging's `extra=`) is output too.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, trace_id and span_id (when a
    span is current: every record logged while a request is handled), extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            out["trace_id"] = trace.format_trace_id(span.trace_id)
            out["span_id"] = trace.format_span_id(span.span_id)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str, fmt: str) -> None:
    """`fmt`: json or text. Installs one stderr handler on the root logger (replacing the one
    an earlier call installed; other handlers stay)."""
    handler = logging.StreamHandler()
    handler.set_name("loramux")
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "loramux"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


# Libraries that talk at import: torchao (its optional native kernels, when it is installed,
# imported by transformers), torch's pytree deprecations (torchao's enums), bitsandbytes and
# the kernels hub (its CPU kernels' trust check). Their warnings are about their own
# internals, not about this server: shown at --log-level debug only. Errors still show.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "torch._dynamo", "bitsandbytes", "kernels", "py.warnings")
# transformers and peft keep their warnings (weights missing or newly initialised, keys that do
# not match: a model that loaded wrongly must say so); their advisories and progress bars go.


def quiet_libraries(level: str) -> None:
    """Before the model libraries are imported: their chatter (warnings, native-library
    probes, progress bars) goes through logging, at ERROR unless `level` is debug; Python
    warnings become log records (so `--log-format json` keeps every line JSON)."""
    import os
    import warnings

    debug = level.lower() == "debug"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "debug" if debug else "warning")
    logging.captureWarnings(True)
    if not debug:
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


def quiet_progress_bars() -> None:
    """transformers' own progress bars ("Loading weights"), once it is imported."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
