"""The one place where domain errors become gRPC statuses.

Every failure leaves the server as a canonical code plus google.rpc.Status details: an
ErrorInfo (domain "loramux.dev", the error's stable reason, its numbers as metadata),
a BadRequest naming the request field at fault if one is, a QuotaFailure when a tenant's
quota was reached, and a RetryInfo when retrying later can succeed (a full queue). The details travel in the
`grpc-status-details-bin` trailer, sent with `context.abort` (not abort_with_status, which
leaves tracing interceptors recording status 0).
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from loramux.server.errors import InternalError, Kind, LoramuxError, QuotaExceeded

log = logging.getLogger(__name__)

DOMAIN = "loramux.dev"
DETAILS_KEY = "grpc-status-details-bin"

_CODES = {
    Kind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Kind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Kind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Kind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Kind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Kind.CANCELLED: grpc.StatusCode.CANCELLED,
    Kind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Kind.ABORTED: grpc.StatusCode.ABORTED,
    Kind.INTERNAL: grpc.StatusCode.INTERNAL,
    Kind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Kind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
}


def to_status(error: BaseException, log_unexpected: bool = True) -> status_pb2.Status:
    """google.rpc.Status for any exception; unexpected ones become INTERNAL without internals
    (with a correlation id that the log line carries too)."""
    if not isinstance(error, LoramuxError):
        error = InternalError.logged(error) if log_unexpected else InternalError("-")
    code = _CODES[error.kind]
    details = [error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)]
    if error.field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message, reason=error.reason)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if isinstance(error, QuotaExceeded):
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=f"tenant:{error.metadata.get('tenant', '')}", description=error.message
        )
        details.append(error_details_pb2.QuotaFailure(violations=[violation]))
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=code.value[0], message=error.message, details=packed)


def grpc_code(status: status_pb2.Status) -> grpc.StatusCode:
    return next(c for c in grpc.StatusCode if c.value[0] == status.code)


async def abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    status = to_status(error)
    await context.abort(grpc_code(status), status.message, trailing_metadata=((DETAILS_KEY, status.SerializeToString()),))




def code_of(error: LoramuxError) -> grpc.StatusCode:
    return _CODES[error.kind]
