"""The front doors' thread pools for blocking engine calls, one per kind of work, each taking
turns between tenants (fair_executor.py)."""

from __future__ import annotations

import asyncio
import functools

from loramux.server.cpu_threads import limit_to_one_thread
from loramux.server.front_door.fair_executor import FairExecutor
from loramux.server.tenancy.auth import caller


class Pools:
    """Bounded thread pools for blocking work, one per kind, so that one kind cannot starve
    another: tokenizing and queueing generate calls (admission), and adapter administration
    (Hub resolution, reading and validating files, waiting for a slot). Each takes turns
    between tenants (fair_executor.py), so that one tenant's burst cannot starve another
    either. Waiting on operations needs no thread (it is awaited)."""

    def __init__(self, admission_threads: int = 4, adapter_threads: int = 4):
        self.admission = FairExecutor(admission_threads, "loramux-admit", initializer=limit_to_one_thread)
        self.adapters = FairExecutor(adapter_threads, "loramux-adapters", initializer=limit_to_one_thread)

    def shutdown(self) -> None:
        self.admission.shutdown()
        self.adapters.shutdown()


async def blocking(pool: FairExecutor, fn, *args, **kwargs):
    """Run `fn` on `pool` in the calling tenant's turn, and await it."""
    return await asyncio.wrap_future(pool.submit(caller.get().tenant, functools.partial(fn, *args, **kwargs)))
