"""The API key on every call: `authorization: Bearer <key>` metadata, added by an interceptor
(call credentials would need TLS; a development server may run without it)."""

from __future__ import annotations

import collections
import os

import grpc

API_KEY_ENV = "LORAMUX_API_KEY"


def resolve_api_key(api_key: str | None) -> str | None:
    """The key given, else LORAMUX_API_KEY, else None (no credentials sent)."""
    return api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None


class _Details(
    collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


def _with_key(details, header: tuple[str, str]):
    metadata = list(details.metadata or []) + [header]
    return _Details(details.method, details.timeout, metadata, details.credentials,
                    getattr(details, "wait_for_ready", None), getattr(details, "compression", None))


class KeyInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """For blocking channels (`grpc.intercept_channel`)."""

    def __init__(self, api_key: str):
        self._header = ("authorization", f"Bearer {api_key}")

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(_with_key(client_call_details, self._header), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(_with_key(client_call_details, self._header), request)


class _AioDetails(
    collections.namedtuple("_AioDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready")),
    grpc.aio.ClientCallDetails,
):
    pass


def _aio_with_key(details, header: tuple[str, str]):
    metadata = grpc.aio.Metadata(*(tuple(details.metadata or ())), header)
    return _AioDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


class AioKeyUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, api_key: str):
        self._header = ("authorization", f"Bearer {api_key}")

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_aio_with_key(client_call_details, self._header), request)


class AioKeyStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, api_key: str):
        self._header = ("authorization", f"Bearer {api_key}")

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_aio_with_key(client_call_details, self._header), request)


def aio_interceptors(api_key: str | None) -> list:
    return [AioKeyUnary(api_key), AioKeyStream(api_key)] if api_key else []
