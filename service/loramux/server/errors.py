"""Typed domain errors with stable reasons.

Each error carries a `kind` (what sort of failure, independent of transport), a stable
`reason` (UPPER_SNAKE_CASE, part of the API), the request `field` at fault when there is
one, and `metadata` with the numbers. The gRPC layer maps kinds to status codes in one
place (loramux.server.grpc_api.status); nothing else knows about gRPC.
"""

from __future__ import annotations

import enum
import logging
import uuid

log = logging.getLogger(__name__)


class Kind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    UNAVAILABLE = "unavailable"
    ABORTED = "aborted"
    INTERNAL = "internal"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"


MAX_MESSAGE_CHARS = 1024
MAX_METADATA_CHARS = 256  # per value: request fields echoed back are cut to this


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LoramuxError(Exception):
    kind: Kind = Kind.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        reason: str | None = None,
        retry_after_s: float | None = None,
        **metadata: object,
    ):
        message = _cut(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s  # sent as google.rpc.RetryInfo when set
        if reason is not None:
            self.reason = reason
        self.metadata = shown_metadata(metadata)

    def __reduce__(self):
        """Pickled whole (kind, reason, field, metadata), whatever the subclass's constructor
        takes: errors cross from an engine process of its own to the front doors'."""
        return (_restored, (type(self), self.args, dict(self.__dict__)))


def _restored(cls: type[LoramuxError], args: tuple, state: dict) -> LoramuxError:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


def shown_metadata(metadata: dict) -> dict[str, str]:
    """Error metadata as callers see it: every value a string of at most MAX_METADATA_CHARS."""
    return {str(k): _cut(str(v), MAX_METADATA_CHARS) for k, v in metadata.items()}


class InternalError(LoramuxError):
    """Something went wrong that is not the caller's doing. Clients see only a correlation id;
    the log line with the same id has the details."""

    kind = Kind.INTERNAL
    reason = "INTERNAL"

    def __init__(self, correlation_id: str):
        super().__init__(f"internal error (correlation id {correlation_id}); the server log has the details",
                         correlation_id=correlation_id)

    @classmethod
    def logged(cls, error: BaseException, what: str = "unexpected error") -> InternalError:
        """Log an unexpected exception (with its traceback) under a fresh correlation id."""
        correlation_id = uuid.uuid4().hex[:16]
        log.error("%s (correlation id %s)", what, correlation_id, exc_info=error, extra={"correlation_id": correlation_id})
        return cls(correlation_id)


class InvalidSettings(LoramuxError):
    kind = Kind.INVALID_ARGUMENT
    reason = "INVALID_SETTINGS"


class InvalidRequest(LoramuxError):
    """A request field is wrong; `reason` names the rule, `field` the field."""

    kind = Kind.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class PromptTooLong(LoramuxError):
    kind = Kind.INVALID_ARGUMENT
    reason = "PROMPT_TOO_LONG"


class NoChatTemplate(LoramuxError):
    kind = Kind.INVALID_ARGUMENT
    reason = "NO_CHAT_TEMPLATE"


class AdapterNotFound(LoramuxError):
    kind = Kind.NOT_FOUND
    reason = "ADAPTER_NOT_FOUND"


class AdapterExists(LoramuxError):
    kind = Kind.ALREADY_EXISTS
    reason = "ADAPTER_ALREADY_EXISTS"


class SourceOutsideRoot(LoramuxError):
    kind = Kind.INVALID_ARGUMENT
    reason = "SOURCE_OUTSIDE_ROOT"


class SourceNotFound(LoramuxError):
    kind = Kind.NOT_FOUND
    reason = "SOURCE_NOT_FOUND"


class SourceUnavailable(LoramuxError):
    """The source could not be fetched now (network, Hub errors); retrying may work."""

    kind = Kind.UNAVAILABLE
    reason = "SOURCE_UNAVAILABLE"


class AdapterInvalid(LoramuxError):
    """The adapter's files are unreadable or not a LoRA checkpoint loramux can serve.

    Reasons: ADAPTER_CORRUPT, ADAPTER_CONFIG_INVALID, ADAPTER_UNSUPPORTED, ADAPTER_PICKLE_REFUSED,
    ADAPTER_WEIGHTS_MISSING, ADAPTER_TOO_LARGE (object-storage files above what an adapter can need).
    """

    kind = Kind.INVALID_ARGUMENT
    reason = "ADAPTER_CORRUPT"


class AdapterIncompatible(LoramuxError):
    """The adapter is a valid checkpoint but does not fit the served base model or settings.

    Reasons: ADAPTER_INCOMPATIBLE (other base model, missing module, shape),
    ADAPTER_RANK_TOO_LARGE, ADAPTER_MODIFIES_BASE.
    """

    kind = Kind.FAILED_PRECONDITION
    reason = "ADAPTER_INCOMPATIBLE"


class AdapterChanged(LoramuxError):
    """An evicted adapter's files changed on disk since it was loaded; load it again."""

    kind = Kind.FAILED_PRECONDITION
    reason = "ADAPTER_FILES_CHANGED"


class PinLimit(LoramuxError):
    kind = Kind.FAILED_PRECONDITION
    reason = "PIN_LIMIT_REACHED"


class NoSlotFree(LoramuxError):
    """warm/pin found every slot held by running requests or pins for longer than it may wait.
    The registration stands; retrying later can succeed."""

    kind = Kind.RESOURCE_EXHAUSTED
    reason = "NO_SLOT_AVAILABLE"


class NonFiniteOutput(LoramuxError):
    """The model's scores for one row became NaN or infinite (an adapter's weights overflow the
    serving dtype, say). Only that row fails."""

    kind = Kind.FAILED_PRECONDITION
    reason = "NON_FINITE_LOGITS"


class GrammarFailed(LoramuxError):
    """A request's structured-output constraint failed while its answer was being generated
    (the grammar ran past its per-token work limit, or allowed no token)."""

    kind = Kind.INVALID_ARGUMENT
    reason = "GRAMMAR_FAILED"


class Interrupted(LoramuxError):
    """Work that a restart cut short (a merge running when the server stopped)."""

    kind = Kind.ABORTED
    reason = "INTERRUPTED_BY_RESTART"


class MergeFailed(LoramuxError):
    kind = Kind.FAILED_PRECONDITION
    reason = "MERGE_NOT_CONFIGURED"


class MergeOutputExists(LoramuxError):
    kind = Kind.ALREADY_EXISTS
    reason = "MERGE_OUTPUT_EXISTS"


class MergeOutputForeign(LoramuxError):
    """overwrite was asked for a directory that is not a previous merge's output."""

    kind = Kind.FAILED_PRECONDITION
    reason = "MERGE_OUTPUT_NOT_A_MERGE"


class MergeUnsupported(LoramuxError):
    """The base's checkpoint cannot be merged into (no safetensors files, names that do not
    match the served modules)."""

    kind = Kind.FAILED_PRECONDITION
    reason = "MERGE_UNSUPPORTED"


class MergeDiskFull(LoramuxError):
    """The merge root's disk would keep less than --merge-disk-reserve-mib free: retriable
    once outputs are removed or merges under way end."""

    kind = Kind.RESOURCE_EXHAUSTED
    reason = "MERGE_DISK_FULL"


class MergeNotFinite(LoramuxError):
    kind = Kind.FAILED_PRECONDITION
    reason = "MERGE_NOT_FINITE"


class OperationRunning(LoramuxError):
    """DeleteOperation on an operation that has not ended (cancel it first)."""

    kind = Kind.FAILED_PRECONDITION
    reason = "OPERATION_RUNNING"


class OperationNotFound(LoramuxError):
    kind = Kind.NOT_FOUND
    reason = "OPERATION_NOT_FOUND"


class QueueFull(LoramuxError):
    kind = Kind.RESOURCE_EXHAUSTED
    reason = "QUEUE_FULL"


class DeadlineExceeded(LoramuxError):
    kind = Kind.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Cancelled(LoramuxError):
    kind = Kind.CANCELLED
    reason = "CANCELLED"


class Unauthenticated(LoramuxError):
    """No API key, or one the server does not know (or that expired)."""

    kind = Kind.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(LoramuxError):
    """A known key whose role does not allow the call, or that names another tenant."""

    kind = Kind.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class QuotaExceeded(LoramuxError):
    """A tenant's quota (server/quotas.py) would be exceeded; sent with a google.rpc.QuotaFailure."""

    kind = Kind.RESOURCE_EXHAUSTED
    reason = "QUOTA_EXCEEDED"


class ShuttingDown(LoramuxError):
    kind = Kind.UNAVAILABLE
    reason = "SHUTTING_DOWN"


class EngineExited(LoramuxError):
    """The engine's own process (--engine-process) ended while the call waited on it: the
    server stops answering as ready, and its orchestrator restarts it."""

    kind = Kind.UNAVAILABLE
    reason = "ENGINE_EXITED"


class OutOfMemory(LoramuxError):
    """The accelerator or host ran out of memory for a batch; only its requests fail."""

    kind = Kind.RESOURCE_EXHAUSTED
    reason = "OUT_OF_MEMORY"
