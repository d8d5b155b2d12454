"""Per-tenant quotas, and the usage they are checked against.

Quotas come from the keys file's `tenants` section (`server/keys.py`). A limit the file
leaves out is unlimited, but for three that every tenant gets by default, so that no tenant
can fill the shared store or the merge disk at the default flags: `adapters`
(`--tenant-max-adapters`, 1000), `merge_outputs` (`--tenant-max-merge-outputs`, 8) and
`merge_output_gib` (`--tenant-max-merge-output-gib`, none: the count bounds it at about 8
copies of the base):

    tenants:
      team-a:
        quotas: {adapters: 50, pinned: 2, requests: 32, tokens_per_minute: 200000, merges: 1,
                 merge_outputs: 4, merge_output_gib: 100}

- adapters: adapters registered at once; pinned: adapters pinned at once;
- requests: generate requests in flight at once (queued or running);
- queued: generate requests waiting to be admitted at once (within `requests`);
- tokens_per_minute: prompt tokens plus `max_new_tokens` of the requests accepted in the last
  60 s (charged when a request is accepted: what it may use, so a burst cannot overshoot);
- merges: merges queued or running at once;
- merge_outputs: merge outputs kept under the merge root (and merges that will write one);
- merge_output_gib: their bytes, in GiB (a merge is counted at its estimated size until it ends).

A request over a limit is refused with RESOURCE_EXHAUSTED / QUOTA_EXCEEDED, carrying a
google.rpc.QuotaFailure (subject `tenant:<name>`, which limit) and, for the limits that
free up by themselves (requests in flight or queued, tokens per minute, merges), a RetryInfo. Other tenants
are not affected.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque

from loramux.server.errors import QuotaExceeded

WINDOW_S = 60.0
QUOTA_NAMES = ("adapters", "pinned", "requests", "queued", "tokens_per_minute", "merges", "merge_outputs",
               "merge_output_gib")


@dataclasses.dataclass(frozen=True)
class Quotas:
    adapters: int | None = None
    pinned: int | None = None
    requests: int | None = None
    queued: int | None = None
    tokens_per_minute: int | None = None
    merges: int | None = None
    merge_outputs: int | None = None
    merge_output_gib: int | None = None


UNLIMITED = Quotas()


def with_defaults(quotas: Quotas | None, settings) -> Quotas:
    """A tenant's quotas: what the keys file gives (None: nothing), the server's defaults for
    the limits it leaves out."""
    quotas = quotas or UNLIMITED
    defaults = {"adapters": settings.tenant_max_adapters, "merge_outputs": settings.tenant_max_merge_outputs,
                "merge_output_gib": settings.tenant_max_merge_output_gib}
    return dataclasses.replace(quotas, **{name: value for name, value in defaults.items()
                                          if getattr(quotas, name) is None})


def refuse(tenant: str, quota: str, limit: int, used: int, what: str, retry_after_s: float | None = None) -> QuotaExceeded:
    return QuotaExceeded(
        f"tenant {tenant!r} has {what}; its quota {quota} is {limit}",
        tenant=tenant, quota=quota, limit=limit, used=used, retry_after_s=retry_after_s,
    )


class RequestUsage:
    """Requests in flight and tokens accepted in the last minute, per tenant."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        # Tenants with a tokens_per_minute quota: (accepted at, tokens) within the window, and their sum.
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self._token_sum: dict[str, int] = {}

    def begin(self, tenant: str, quotas: Quotas, tokens: int, retry_hint_s: float) -> None:
        """Count a request in, or refuse it (QuotaExceeded) leaving nothing counted."""
        now = self._clock()
        with self._lock:
            flying = self._in_flight.get(tenant, 0)
            if quotas.requests is not None and flying >= quotas.requests:
                raise refuse(tenant, "requests", quotas.requests, flying, f"{flying} requests in flight",
                             retry_after_s=max(retry_hint_s, 0.1))
            limit = quotas.tokens_per_minute
            if limit is not None:
                window = self._tokens.setdefault(tenant, deque())
                used = self._token_sum.get(tenant, 0)
                while window and window[0][0] <= now - WINDOW_S:
                    used -= window.popleft()[1]
                self._token_sum[tenant] = used
                if tokens > limit:  # waiting never helps
                    raise refuse(tenant, "tokens_per_minute", limit, used,
                                 f"a request that may use {tokens} tokens (prompt and max_new_tokens)")
                if used + tokens > limit:
                    # The earliest time enough of the window has expired for this request to fit.
                    freed, wait = 0, WINDOW_S
                    for at, n in window:
                        freed += n
                        if used - freed + tokens <= limit:
                            wait = at + WINDOW_S - now
                            break
                    raise refuse(tenant, "tokens_per_minute", limit, used,
                                 f"{used} tokens accepted in the last minute and this request may use {tokens}",
                                 retry_after_s=max(wait, 0.1))
            self._in_flight[tenant] = flying + 1
            if limit is not None:
                window.append((now, tokens))
                self._token_sum[tenant] += tokens

    def end(self, tenant: str) -> None:
        with self._lock:
            left = self._in_flight.get(tenant, 0) - 1
            if left > 0:
                self._in_flight[tenant] = left
            else:
                self._in_flight.pop(tenant, None)

    def in_flight(self, tenant: str) -> int:
        with self._lock:
            return self._in_flight.get(tenant, 0)
