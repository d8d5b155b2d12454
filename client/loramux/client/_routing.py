"""Adapter affinity across replicas with gRPC's own load balancing.

Given a target that names several replicas (`dns:///loramux-headless:50051`,
`ipv4:10.0.0.1:50051,10.0.0.2:50051`), the channel uses `ring_hash` on a request header: every
call carries `x-loramux-affinity`, which for a request naming an adapter is the same value for
the same caller and adapter (so they land on the replica that already holds it), and random for
anything else (spread evenly). When a replica goes away only its share of the ring moves.
UNAVAILABLE is retried (on another replica, since the ring skips a dead one).

grpcio reads the request-hash-header setting only with the environment variable
GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY=true, set before the channel is made; the
client sets it when affinity is on (process-wide; it changes nothing for other channels).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import uuid

import grpc

AFFINITY_HEADER = "x-loramux-affinity"
_ENV = "GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY"
_SCHEMES = ("dns:", "ipv4:", "ipv6:")


def wants_affinity(target: str) -> bool:
    """Affinity by default for targets that can name several replicas."""
    return target.startswith(_SCHEMES)


def service_config() -> str:
    return json.dumps({
        "loadBalancingConfig": [{"ring_hash_experimental": {"requestHashHeader": AFFINITY_HEADER}}],
        "methodConfig": [{
            "name": [{"service": "loramux.v1.Loramux"}, {"service": "google.longrunning.Operations"}],
            "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
                            "retryableStatusCodes": ["UNAVAILABLE"]},
        }],
    })


def channel_options(options: list | None) -> list:
    os.environ[_ENV] = "true"
    return [*(options or []), ("grpc.service_config", service_config()), ("grpc.enable_retries", 1)]


class _Details(
    collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class AffinityInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the affinity header: `<caller>/<adapter_id>` for requests naming an adapter (the
    caller is a fingerprint of the API key, so two tenants' same-named adapters hash apart),
    a random value otherwise."""

    def __init__(self, api_key: str | None):
        self._caller = hashlib.sha256((api_key or "").encode()).hexdigest()[:16]
        self._operations: dict[str, str] = {}  # operation name -> the adapter whose replica runs it

    def remember(self, operation: str, adapter_id: str) -> None:
        """Calls about `operation` (a merge of `adapter_id`) go where the merge went."""
        self._operations[operation] = adapter_id

    def _details(self, details, request):
        adapter = getattr(request, "adapter_id", "") or self._operations.get(getattr(request, "name", ""), "")
        value = f"{self._caller}/{adapter}" if adapter else uuid.uuid4().hex
        metadata = [*(details.metadata or []), (AFFINITY_HEADER, value)]
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


class _AioAffinity:
    def __init__(self, api_key: str | None, shared: AffinityInterceptor | None = None):
        self._sync = shared or AffinityInterceptor(api_key)

    def _details(self, details, request):
        value = self._sync._details(details, request).metadata[-1]
        metadata = grpc.aio.Metadata(*(tuple(details.metadata or ())), value)
        return _AioDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


class AioAffinityUnary(_AioAffinity, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details, request), request)


class AioAffinityStream(_AioAffinity, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details, request), request)


def aio_affinity_interceptors(api_key: str | None) -> tuple[list, AffinityInterceptor]:
    """The asyncio interceptors, and the router they share (for `remember`)."""
    router = AffinityInterceptor(api_key)
    return [AioAffinityUnary(api_key, router), AioAffinityStream(api_key, router)], router
