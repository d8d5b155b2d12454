"""Client interceptors that add one header to every call, computed from the request: the API
key (`_auth.py`) and the affinity key (`_routing.py`) both ride on them."""

from __future__ import annotations

import collections
from collections.abc import Callable

import grpc

HeaderFor = Callable[[object], tuple[str, str]]  # request -> (name, value)


class _Details(
    collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class HeaderInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """For blocking channels (`grpc.intercept_channel`)."""

    def __init__(self, header_for: HeaderFor):
        self._header_for = header_for

    def _details(self, details, request):
        metadata = [*(details.metadata or []), self._header_for(request)]
        return _Details(details.method, details.timeout, metadata, details.credentials,
                        getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details, request), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details, request), request)


class _AioDetails(
    collections.namedtuple("_AioDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready")),
    grpc.aio.ClientCallDetails,
):
    pass


class _AioHeader:
    def __init__(self, header_for: HeaderFor):
        self._header_for = header_for

    def _details(self, details, request):
        metadata = grpc.aio.Metadata(*(tuple(details.metadata or ())), self._header_for(request))
        return _AioDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


class _AioUnary(_AioHeader, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details, request), request)


class _AioStream(_AioHeader, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details, request), request)


def aio_header_interceptors(header_for: HeaderFor) -> list:
    """The asyncio interceptors (unary and server-streaming calls) adding `header_for(request)`."""
    return [_AioUnary(header_for), _AioStream(header_for)]


class HeaderStub:
    """A stub whose every call carries `header` (name, value): for an asyncio channel made
    elsewhere, which takes no interceptor after it is made."""

    def __init__(self, stub, header: tuple[str, str]):
        self._stub = stub
        self._header = header

    def __getattr__(self, name: str):
        method = getattr(self._stub, name)

        def call(request, *, metadata=(), **kwargs):
            return method(request, metadata=(*(metadata or ()), self._header), **kwargs)

        return call
