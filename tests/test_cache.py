"""The tiered cache, step by step: exact slot table, host LRU order and tiers."""

import threading
import time

import pytest
import torch
from torch import nn

from loramux.server.adapters.cache import NoSlotAvailable, Tier, TieredAdapterCache
from loramux.server.lora.weights import AdapterWeights, ModuleLora
from loramux.server.lora.slot_bank import SlotBank

D = ACC, HOST, DISK = Tier.ACCELERATOR, Tier.HOST, Tier.DISK


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 4)


def weights(seed: int, rank: int = 2) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    return AdapterWeights({
        "q_proj": ModuleLora(torch.randn(rank, 8, generator=g), torch.randn(8, rank, generator=g), 1.0 + seed),
        "v_proj": ModuleLora(torch.randn(rank, 8, generator=g), torch.randn(4, rank, generator=g), 2.0 + seed),
    })


SIZE = weights(0).nbytes  # every adapter here has the same size


class Files:
    """Stands in for tier 3: what reload() reads, and how often."""

    def __init__(self):
        self.reads: list[int] = []
        self.delay = 0.0

    def __call__(self, uid: int) -> AdapterWeights:
        time.sleep(self.delay)
        self.reads.append(uid)
        return weights(uid)


def make(slots=2, host_adapters=2, accelerator_bytes=None):
    bank = SlotBank(TinyModel(), ("q_proj", "v_proj"), num_slots=slots, max_rank=4)
    files = Files()
    cache = TieredAdapterCache(bank, host_adapters * SIZE, files, accelerator_capacity_bytes=accelerator_bytes)
    return cache, bank, files


def tiers(cache, uids):
    return [cache.tier(u) for u in uids]


def test_lru_promotion_and_eviction_step_by_step():
    cache, bank, files = make(slots=2, host_adapters=2)
    assert [cache.add(u, weights(u)) for u in (1, 2, 3)] == [HOST, HOST, HOST]
    # 3 did not fit beside 1 and 2: the host LRU dropped 1 to disk
    assert tiers(cache, (1, 2, 3)) == [DISK, HOST, HOST]
    assert cache.snapshot().host == (2, 3)

    assert cache.acquire(2) == 0
    assert cache.acquire(3) == 1
    snap = cache.snapshot()
    assert snap.slot_table == (2, 3) and snap.host == () and snap.in_use == {2: 1, 3: 1}
    cache.release(2)
    cache.release(3)
    assert cache.ensure_in_memory(1) is DISK and files.reads == [1]
    assert cache.snapshot().host == (1,)

    # 1 needs a slot: 2 is the least recently released, so 2 goes back to host memory
    assert cache.acquire(1) == 0
    snap = cache.snapshot()
    assert snap.slot_table == (1, 3) and snap.host == (2,) and tiers(cache, (1, 2, 3)) == [ACC, HOST, ACC]
    # the evicted adapter's host copy is exactly what went into the slot
    back = cache._host[2]
    assert torch.equal(back.modules["q_proj"].a, weights(2).modules["q_proj"].a) and back.modules["v_proj"].scale == 4.0
    assert torch.equal(bank.layers["q_proj"].a_t[0], weights(1).modules["q_proj"].a.T)
    cache.release(1)


def test_adapter_in_use_is_never_evicted_and_full_slots_refuse():
    cache, bank, _ = make(slots=2, host_adapters=4)
    for u in (1, 2, 3):
        cache.add(u, weights(u))
    cache.acquire(1)
    cache.acquire(2)
    assert not cache.slots_available_for({3})
    with pytest.raises(NoSlotAvailable):
        cache.acquire(3)
    assert cache.snapshot().slot_table == (1, 2) and cache.tier(3) is HOST  # put back, not lost
    cache.release(1)
    assert cache.slots_available_for({3}) and not cache.slots_available_for({3, 4})
    assert cache.acquire(3) == 0 and cache.snapshot().slot_table == (3, 2)


def test_pinned_adapter_stays_in_its_slot():
    cache, _, _ = make(slots=2, host_adapters=4)
    for u in (1, 2, 3, 4):
        cache.add(u, weights(u))
    cache.acquire(1)
    assert cache.pin(1, max_pinned=1)
    cache.release(1)
    for u in (2, 3, 4, 2, 3):
        slot = cache.acquire(u)
        assert slot == 1
        cache.release(u)
    snap = cache.snapshot()
    assert snap.slot_table == (1, 3) and snap.pinned == {1} and cache.pinned_count() == 1


def test_remove_while_in_use_frees_and_zeroes_the_slot_on_release():
    cache, bank, _ = make(slots=2, host_adapters=4)
    cache.add(1, weights(1))
    cache.acquire(1)
    cache.remove(1)
    assert cache.snapshot().slot_table == (1, None)  # still serving the running request
    assert bank.layers["q_proj"].a_t[0].abs().sum() > 0
    cache.release(1)
    assert cache.snapshot().slot_table == (None, None)
    layer = bank.layers["v_proj"]
    assert 0 not in bank.layers["q_proj"].a_t and layer.scales[0] == 0 and layer.ranks[0] == 0
    assert bank.resident_bytes() == 0 and cache.accelerator_bytes() == 0


def test_adapter_larger_than_host_tier_goes_straight_to_a_slot():
    cache, _, files = make(slots=1, host_adapters=0)
    assert cache.add(1, weights(1)) is DISK
    assert cache.ensure_in_memory(1) is DISK and cache.tier(1) is HOST
    assert cache.acquire(1) == 0
    cache.release(1)
    cache.add(2, weights(2))
    cache.ensure_in_memory(2)
    assert cache.acquire(2) == 0  # 1 evicted, and with no host room it drops to disk
    assert tiers(cache, (1, 2)) == [DISK, ACC] and files.reads == [1, 2]


def test_concurrent_requests_read_an_adapter_once():
    cache, _, files = make(slots=2, host_adapters=1)
    cache.add(1, weights(1))
    cache.add(2, weights(2))  # pushes 1 to disk
    files.delay = 0.2
    found = []
    threads = [threading.Thread(target=lambda: found.append(cache.ensure_in_memory(1))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert files.reads == [1] and found == [DISK] * 6 and cache.tier(1) is HOST


def test_failed_reload_is_reported_to_every_waiter():
    cache, _, files = make(slots=1, host_adapters=0)
    cache.add(1, weights(1))

    def broken(uid):
        time.sleep(0.1)
        raise ValueError("files changed")

    cache._reload = broken
    errors = []

    def load():
        try:
            cache.ensure_in_memory(1)
        except ValueError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == ["files changed"] * 3 and cache.tier(1) is DISK


def sized(seed: int, rank: int) -> AdapterWeights:
    return weights(seed, rank)


def test_residency_is_bounded_in_bytes_at_true_size():
    # Room for 8 rank-1 adapters' bytes, in 8 slots: one rank-4 adapter takes the room of four rank-1 ones.
    unit = sized(0, 1).nbytes
    cache, bank, _ = make(slots=8, host_adapters=100, accelerator_bytes=8 * unit)
    for uid in range(1, 7):
        cache.add(uid, sized(uid, 1))
    cache.add(10, sized(10, 4))
    for uid in range(1, 7):
        cache.acquire(uid)
        cache.release(uid)
    assert cache.accelerator_bytes() == bank.resident_bytes() == 6 * unit  # true sizes, not rank-4 slots
    assert cache.slots_available_for({10}) is True
    cache.acquire(10)  # needs 4 units: the two least recently used rank-1 adapters go to host memory
    assert tiers(cache, [1, 2, 3, 4, 5, 6, 10]) == [HOST, HOST, ACC, ACC, ACC, ACC, ACC]
    assert cache.accelerator_bytes() == bank.resident_bytes() == 8 * unit
    for uid in (3, 4, 5):
        cache.acquire(uid)  # in use: not evictable
    assert cache.slots_available_for({1}) is True  # 6 can go
    assert cache.slots_available_for({1, 2}) is False  # 6 frees one unit; two are needed
    cache.acquire(1)  # 6 goes to host memory
    with pytest.raises(NoSlotAvailable):
        cache.acquire(2)  # nothing left to evict: everything resident is in use
    assert tiers(cache, [1, 2, 6]) == [ACC, HOST, HOST]  # the failed attempt evicted nothing
    assert cache.audit() == []


def test_pins_are_bounded_in_bytes_too():
    unit = sized(0, 1).nbytes
    cache, _, _ = make(slots=8, host_adapters=100, accelerator_bytes=8 * unit)
    cache.add(1, sized(1, 4))
    cache.add(2, sized(2, 4))
    for uid in (1, 2):
        cache.acquire(uid)
    assert cache.pin(1, max_pinned=7, max_pinned_bytes=4 * unit)
    assert not cache.pin(2, max_pinned=7, max_pinned_bytes=4 * unit)
    assert cache.pinned_bytes() == 4 * unit and cache.pinned_count() == 1
