"""Only the engine thread runs torch on every core: helper threads are limited to one OpenMP
thread, and start-up work runs on a thread that ends with it (server/cpu_threads.py)."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from loramux.server.cpu_threads import in_own_thread, limit_to_one_thread

pytestmark = pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(), reason="torch without OpenMP has no per-thread teams")


def fresh_thread_count() -> int:
    return in_own_thread(torch.get_num_threads)


def test_helper_threads_run_single_threaded_while_the_engine_keeps_every_core():
    full = fresh_thread_count()
    if full < 2:
        torch.set_num_threads(2)  # the limit must be visible against a count above one
        full = fresh_thread_count()
    with ThreadPoolExecutor(2, initializer=limit_to_one_thread) as pool:
        # Work that would start a parallel region, then the count each helper sees.
        seen = list(pool.map(lambda _: (torch.randn(512, 512) @ torch.randn(512, 512), torch.get_num_threads())[1], range(4)))
    assert seen == [1, 1, 1, 1]
    assert fresh_thread_count() == full  # a new thread (the engine's) still gets every core


def test_in_own_thread_returns_and_raises_on_a_thread_that_ends():
    names = []
    assert in_own_thread(lambda a, b: (names.append(threading.current_thread()), a + b)[1], 2, 3) == 5
    assert names[0] is not threading.current_thread() and not names[0].is_alive()
    with pytest.raises(ZeroDivisionError):
        in_own_thread(lambda: 1 / 0)


def test_the_servers_pools_are_limited(assets):
    from loramux.server.front_door.pools import Pools
    from loramux.server.model.base_model import load_base_model
    from loramux.server.engine.engine import Engine

    pools = Pools()
    engine = Engine(assets.settings(), load_base_model(assets.settings()))
    try:
        for pool in (pools.admission, pools.adapters):  # they take turns between tenants
            assert pool.submit("a-tenant", torch.get_num_threads).result() == 1
        for pool in (engine._io, engine.merges._executor):
            assert pool.submit(torch.get_num_threads).result() == 1
    finally:
        pools.shutdown()
        engine.stop()
