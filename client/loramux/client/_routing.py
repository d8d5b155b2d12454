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

import hashlib
import json
import os
import uuid
from collections import OrderedDict

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


MAX_OPERATIONS = 4096  # merge operations a client routes by their adapter


class AffinityRouter:
    """The affinity header of each call: `<caller>/<adapter_id>` for requests naming an adapter
    (the caller is a fingerprint of the API key, so two tenants' same-named adapters hash
    apart) or a merge operation of one, a random value otherwise."""

    def __init__(self, api_key: str | None):
        self._caller = hashlib.sha256((api_key or "").encode()).hexdigest()[:16]
        # operation name -> the adapter whose replica runs it; the most recent MAX_OPERATIONS
        self._operations: OrderedDict[str, str] = OrderedDict()

    def remember(self, operation: str, adapter_id: str) -> None:
        """Calls about `operation` (a merge of `adapter_id`) go where the merge went. A
        long-lived client remembers its latest MAX_OPERATIONS merges; a call about an older
        one goes to any replica (each answers for the others)."""
        self._operations[operation] = adapter_id
        self._operations.move_to_end(operation)
        while len(self._operations) > MAX_OPERATIONS:
            self._operations.popitem(last=False)

    def header_for(self, request) -> tuple[str, str]:
        adapter = getattr(request, "adapter_id", "") or self._operations.get(getattr(request, "name", ""), "")
        return AFFINITY_HEADER, f"{self._caller}/{adapter}" if adapter else uuid.uuid4().hex
