"""Typed exceptions for loramux calls, built from the google.rpc.Status details."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


class LoramuxError(Exception):
    """Base of every error a loramux call raises.

    `code` is the gRPC status code, `reason` the server's stable reason (e.g.
    "ADAPTER_NOT_FOUND"; empty when the failure came from the transport), `metadata` the
    numbers that go with it, and `field_violations` (field, description) pairs for the
    request fields at fault. `retry_after` (seconds) is the server's hint for when a retry
    can succeed (google.rpc.RetryInfo), or None. `quota_violations` are (subject, description)
    pairs when a tenant's quota was reached (google.rpc.QuotaFailure).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        metadata=None,
        field_violations=(),
        retry_after: float | None = None,
        quota_violations=(),
    ):
        shown = reason if reason and reason != code.name else ""  # "UNAUTHENTICATED: UNAUTHENTICATED: ..." says it twice
        super().__init__(f"{code.name}: {shown + ': ' if shown else ''}{message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.field_violations = list(field_violations)
        self.retry_after = retry_after
        self.quota_violations = list(quota_violations)


class InvalidArgument(LoramuxError): ...
class NotFound(LoramuxError): ...
class AlreadyExists(LoramuxError): ...
class FailedPrecondition(LoramuxError): ...
class ResourceExhausted(LoramuxError): ...
class DeadlineExceeded(LoramuxError): ...
class Cancelled(LoramuxError): ...
class Unavailable(LoramuxError): ...
class Aborted(LoramuxError): ...
class Unimplemented(LoramuxError): ...
class PermissionDenied(LoramuxError): ...
class Unauthenticated(LoramuxError): ...
class InternalError(LoramuxError): ...


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def from_status(code: grpc.StatusCode, status: status_pb2.Status | None, message: str) -> LoramuxError:
    reason, metadata, violations, retry_after, quota = "", {}, [], None, []
    try:
        if status is not None:
            message = status.message or message
            reason, metadata, violations, retry_after, quota = _details(status)
    except DecodeError:  # details that do not parse: the code and message still say what happened
        reason, metadata, violations, retry_after, quota = "", {}, [], None, []
    cls = _BY_CODE.get(code, InternalError)
    return cls(code, message, reason, metadata, violations, retry_after, quota)


def _details(status: status_pb2.Status):
    """(reason, metadata, field violations, retry after, quota violations) from a status's details."""
    reason, metadata, violations, retry_after, quota = "", {}, [], None, []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            quota = [(v.subject, v.description) for v in failure.violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return reason, metadata, violations, retry_after, quota


def from_rpc_error(error: grpc.RpcError) -> LoramuxError:
    """Works for sync and asyncio call errors alike."""
    status = None
    for key, value in error.trailing_metadata() or ():
        if key == DETAILS_KEY:
            try:
                status = status_pb2.Status.FromString(value)
            except DecodeError:  # a broken server or proxy: the code and message still count
                status = None
    return from_status(error.code(), status, error.details() or "")
