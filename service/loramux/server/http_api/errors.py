"""The one place where domain errors become HTTP responses: OpenAI error objects.

`{"error": {"message", "type", "param", "code"}}` with the HTTP status of the error's kind.
`code` is the error's stable reason in lower case (the gRPC front door's ErrorInfo.reason),
except where OpenAI's API has a code of its own for the same thing, which clients already
handle (`model_not_found`, `context_length_exceeded`). A retryable refusal (429, 503) carries
`Retry-After`. Unexpected exceptions become 500 with a correlation id, never their text.
"""

from __future__ import annotations

import math

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from loramux.server.errors import InternalError, Kind, LoramuxError

STATUS = {
    Kind.INVALID_ARGUMENT: 400,
    Kind.FAILED_PRECONDITION: 400,
    Kind.UNAUTHENTICATED: 401,
    Kind.PERMISSION_DENIED: 403,
    Kind.NOT_FOUND: 404,
    Kind.ALREADY_EXISTS: 409,
    Kind.ABORTED: 409,
    Kind.RESOURCE_EXHAUSTED: 429,
    Kind.CANCELLED: 499,  # the client closed the request (nginx's convention)
    Kind.INTERNAL: 500,
    Kind.UNAVAILABLE: 503,
    Kind.DEADLINE_EXCEEDED: 504,
}
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 408: "invalid_request_error",
         404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
         429: "rate_limit_error", 499: "invalid_request_error"}
OPENAI_CODES = {"ADAPTER_NOT_FOUND": "model_not_found", "PROMPT_TOO_LONG": "context_length_exceeded"}
# The engine's field names as the OpenAI request names them.
OPENAI_PARAMS = {"max_new_tokens": "max_tokens", "prompt_token_ids": "prompt", "return_logprobs": "logprobs",
                 "adapter_id": "model", "structured_output": "response_format"}


def status_of(error: LoramuxError) -> int:
    if error.reason == "REQUEST_TOO_LARGE":
        return 413
    if error.reason == "REQUEST_TIMEOUT":
        return 408
    return STATUS[error.kind]


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(error: BaseException) -> JSONResponse:
    """The response for any exception (unexpected ones logged, with a correlation id)."""
    if not isinstance(error, LoramuxError):
        error = InternalError.logged(error)
    status = status_of(error)
    param = OPENAI_PARAMS.get(error.field, error.field) if error.field else None
    body = error_body(status, error.message, OPENAI_CODES.get(error.reason, error.reason.lower()), param)
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return JSONResponse(body, status_code=status, headers=headers)


async def routing_error(request: Request, error: HTTPException) -> JSONResponse:
    """The router's own refusals (no such route, a method the route does not take) as OpenAI
    error objects too (405 keeps its `Allow` header)."""
    path = request.url.path if len(request.url.path) <= 200 else request.url.path[:197] + "..."
    if error.status_code == 405:
        message, code = f"{path} does not take {request.method[:16]}", "method_not_allowed"
    elif error.status_code == 404:
        message, code = f"{path} is not a route of this server", "not_found"
    else:
        message, code = str(error.detail)[:200], "invalid_request"
    return JSONResponse(error_body(error.status_code, message, code), status_code=error.status_code, headers=error.headers)
