"""The tiered adapter cache: accelerator slots (tier 1), host memory (tier 2), disk (tier 3).

Every registered adapter is in exactly one tier:

- ACCELERATOR: its weights fill one slot of the SlotBank, at their true size. Tier 1 is
  bounded twice: in adapters (`adapter_slots`) and in bytes (`adapter_memory_mib`), so a
  rank-8 adapter costs rank-8 memory and many small adapters stay resident where few large
  ones would. When one needs room, least recently used *evictable* adapters are evicted
  (their weights copied back into tier 2) until both bounds hold. A slot is evictable only
  while no running request uses it (`acquire`/`release` count uses) and the adapter is not
  pinned.
- HOST: a copy in host memory (pinned memory on CUDA), in an LRU bounded in bytes; what
  falls out goes to tier 3.
- DISK: nothing in memory; the adapter's files are read and validated again when needed,
  and refused if their content changed since the adapter was registered.

The LRU bookkeeping uses cachetools. All state changes happen under one lock; reading
files from disk happens outside it, and concurrent requests for the same adapter share
one read. The cache knows tiers and slots, never names, tenants or gRPC.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future

import torch
from cachetools import LRUCache

from loramux.server.lora.weights import AdapterWeights, ModuleLora
from loramux.server.lora.slot_bank import SlotBank
from loramux.server.tiers import Tier  # noqa: F401 (re-exported)


class NoSlotAvailable(Exception):
    """Every slot is in use by running requests or pinned. Callers wait; this never reaches users."""


class AdapterGone(Exception):
    """The uid is not (or no longer) registered. Callers look the name up again."""


class _HostTier(LRUCache):
    """Host copies by adapter uid, bounded in bytes; evicted entries drop to disk."""

    def __init__(self, capacity_bytes: int):
        super().__init__(maxsize=capacity_bytes, getsizeof=lambda w: w.nbytes)
        self.evicted: list[int] = []

    def popitem(self):
        uid, weights = super().popitem()
        self.evicted.append(uid)
        return uid, weights


@dataclasses.dataclass(frozen=True)
class CacheSnapshot:
    slot_table: tuple[int | None, ...]  # slot -> uid of the adapter in it
    host: tuple[int, ...]  # uids in host memory, least recently used first
    host_bytes: int
    in_use: dict[int, int]  # uid -> running requests using it
    pinned: frozenset[int]


class TieredAdapterCache:
    def __init__(
        self,
        bank: SlotBank,
        host_capacity_bytes: int,
        reload: Callable[[int], AdapterWeights],
        host_pin_memory: bool = False,
        accelerator_capacity_bytes: int | None = None,
    ):
        """`reload(uid)` reads and validates an adapter's files again (tier 3 -> memory).
        Tier 1 holds at most `bank.num_slots` adapters and `accelerator_capacity_bytes` bytes
        of adapter weights at their true sizes (None: no byte bound)."""
        self._bank = bank
        self._accelerator_capacity = accelerator_capacity_bytes
        self._reload = reload
        self._pin_memory = host_pin_memory
        self._lock = threading.RLock()
        self._evictable: LRUCache = LRUCache(maxsize=bank.num_slots)  # uids in slots that may go, LRU first
        self._host = _HostTier(host_capacity_bytes)
        self._in_use: Counter[int] = Counter()
        self._pinned: set[int] = set()
        self._ranks: dict[int, AdapterWeights] = {}  # uid -> zero-size template of its shapes/scales
        self._removed: set[int] = set()  # unregistered while in use: freed on last release
        self._loading: dict[int, Future] = {}
        # Read from disk but larger than the whole host tier: held only until acquire() takes it.
        self._parked: dict[int, AdapterWeights] = {}
        self._nbytes: dict[int, int] = {}  # uid -> bytes of its weights (as registered)
        self._slot_bytes: dict[int, int] = {}  # uid -> bytes it takes in a slot (LoRA dtype, true rank)
        # (kind, uid, tier, seconds) for metrics: ("evict", uid, tier evicted from, None) or
        # ("load", uid, tier loaded from, seconds it took).
        self.on_event: Callable[[str, int, Tier, float | None], None] | None = None
        self.last_read_s: dict[int, float] = {}  # uid -> how long its latest read from disk took

    # -- registration -------------------------------------------------------------------

    def add(self, uid: int, weights: AdapterWeights) -> Tier:
        """Register a freshly validated adapter; it starts in host memory (or on disk if it does not fit)."""
        with self._lock:
            if uid in self._ranks:
                raise KeyError(f"adapter uid {uid} is already cached")
            self._ranks[uid] = _template(weights)
            self._nbytes[uid] = weights.nbytes
            self._slot_bytes[uid] = self._bank.adapter_bytes(weights)  # what it will take in a slot
            self._put_host(uid, weights)
            return self.tier(uid)

    def remove(self, uid: int) -> None:
        """Forget an adapter. A slot in use by running requests is freed when they finish; until
        then the adapter counts nowhere (not in usage(), not pinned)."""
        with self._lock:
            self._host.pop(uid, None)
            self._parked.pop(uid, None)
            self._pinned.discard(uid)
            if self._bank.holds(uid) and self._in_use[uid]:
                self._removed.add(uid)
                return
            self._forget(uid)

    def _forget(self, uid: int) -> None:
        if self._bank.holds(uid):
            self._free_slot(uid)
        self._removed.discard(uid)
        self._ranks.pop(uid, None)
        self._nbytes.pop(uid, None)
        self._slot_bytes.pop(uid, None)
        self.last_read_s.pop(uid, None)

    def _known(self, uid: int) -> bool:
        return uid in self._ranks and uid not in self._removed

    # -- tiers --------------------------------------------------------------------------

    def tier(self, uid: int) -> Tier:
        with self._lock:
            if self._bank.holds(uid):
                return Tier.ACCELERATOR
            if uid in self._host or uid in self._parked:
                return Tier.HOST
            return Tier.DISK

    def ensure_in_memory(self, uid: int) -> Tier:
        """Bring a tier-3 adapter into host memory (reading its files once however many ask).

        Called off the engine thread. Returns the tier found before any load. Raises what
        `reload` raises (for instance when the files changed on disk)."""
        with self._lock:
            found = self.tier(uid)
            if found is not Tier.DISK:
                return found
            future = self._loading.get(uid)
            owner = future is None
            if owner:
                future = self._loading[uid] = Future()
        if not owner:
            future.result()
            return found
        try:
            started = time.perf_counter()
            weights = self._reload(uid)
            seconds = time.perf_counter() - started
            with self._lock:
                self.last_read_s[uid] = seconds
                self._emit("load", uid, Tier.DISK, seconds)
                if uid in self._ranks and self.tier(uid) is Tier.DISK:
                    if not self._put_host(uid, weights):
                        # Too big for the host tier: nothing can hold it but a slot.
                        self._parked[uid] = weights
            future.set_result(None)
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            with self._lock:
                self._loading.pop(uid, None)
        return found

    # -- slots --------------------------------------------------------------------------

    def acquire(self, uid: int) -> int:
        """Put the adapter in a slot if needed and mark it in use; returns the slot.

        Engine thread only. The adapter must be in memory (see ensure_in_memory), else KeyError.
        Raises NoSlotAvailable when every slot is in use or pinned."""
        with self._lock:
            if not self._known(uid):
                raise AdapterGone(uid)
            if not self._bank.holds(uid):
                weights = self._host.pop(uid, None) or self._parked.pop(uid, None)
                if weights is None:
                    raise KeyError(f"adapter uid {uid} is not in memory")
                started = time.perf_counter()
                try:
                    self._make_room(self._bank.adapter_bytes(weights))
                except NoSlotAvailable:
                    self._put_host(uid, weights)
                    raise
                self._bank.place(uid, weights)
                self._emit("load", uid, Tier.HOST, time.perf_counter() - started)
            else:
                self._evictable.pop(uid, None)
            self._in_use[uid] += 1
            return self._bank.slot_table().index(uid)

    def release(self, uid: int) -> None:
        with self._lock:
            if self._in_use[uid] <= 0:  # a release without an acquire would corrupt the books
                del self._in_use[uid]
                raise RuntimeError(f"adapter uid {uid} released more often than acquired")
            self._in_use[uid] -= 1
            if self._in_use[uid] > 0:
                return
            del self._in_use[uid]
            if uid in self._removed:
                self._forget(uid)
            elif uid not in self._pinned:
                self._evictable[uid] = True

    def pin(self, uid: int, max_pinned: int, max_pinned_bytes: int | None = None) -> bool:
        """Keep the adapter in its slot for good (it must be in a slot and acquired). False if
        `max_pinned` adapters are pinned already, or pinning it would pin more than
        `max_pinned_bytes`; AdapterGone if it was unloaded meanwhile."""
        with self._lock:
            if not self._known(uid) or not self._bank.holds(uid):
                raise AdapterGone(uid)
            if uid in self._pinned:
                return True
            if len(self._pinned) >= max_pinned:
                return False
            pinned_bytes = sum(self._bank.bytes_of(u) for u in self._pinned) + self._bank.bytes_of(uid)
            if max_pinned_bytes is not None and pinned_bytes > max_pinned_bytes:
                return False
            self._pinned.add(uid)
            self._evictable.pop(uid, None)
            return True

    def pinned_in_slot(self, uid: int) -> bool:
        """Whether the adapter is pinned (so in a slot for good: its rows hold no slot another could take)."""
        with self._lock:
            return uid in self._pinned

    def slots_available_for(self, uids: set[int]) -> bool:
        """Whether all of `uids` could be in slots at once, given pins, running requests and
        the byte budget (evicting every evictable adapter that is not one of them)."""
        with self._lock:
            missing = [uid for uid in uids if not self._bank.holds(uid)]
            others = [uid for uid in self._evictable if uid not in uids]
            free = self._bank.slot_table().count(None) + len(others)
            if len(missing) > free:
                return False
            if self._accelerator_capacity is None:
                return True
            kept = self._bank.counted_bytes() - sum(self._bank.bytes_of(uid) for uid in others)
            need = sum(self._slot_bytes[uid] for uid in missing)
            return kept + need <= self._accelerator_capacity

    def accelerator_bytes(self) -> int:
        with self._lock:
            return self._bank.counted_bytes()

    def pinned_bytes(self) -> int:
        with self._lock:
            return sum(self._bank.bytes_of(uid) for uid in self._pinned)

    def usage(self) -> dict[Tier, tuple[int, int]]:
        """Per tier: (adapters, bytes of their weights)."""
        with self._lock:
            out = {tier: [0, 0] for tier in Tier}
            for uid, nbytes in self._nbytes.items():
                if uid in self._removed:
                    continue
                entry = out[self.tier(uid)]
                entry[0] += 1
                entry[1] += nbytes
            return {tier: (n, b) for tier, (n, b) in out.items()}

    def pinned_count(self) -> int:
        with self._lock:
            return len(self._pinned)

    def registered(self) -> set[int]:
        """The uids that count: registered and not removed."""
        with self._lock:
            return {uid for uid in self._ranks if uid not in self._removed}

    def audit(self) -> list[str]:
        """Every way the books disagree with each other (empty when they balance)."""
        with self._lock:
            problems = []
            resident = {uid for uid in self._bank.slot_table() if uid is not None}
            for uid in self._evictable:
                if uid not in resident or uid in self._pinned or self._in_use[uid]:
                    problems.append(f"uid {uid} is evictable but not in a free, unpinned slot")
            idle = {uid for uid in resident if not self._in_use[uid] and uid not in self._pinned and uid not in self._removed}
            if idle != set(self._evictable.keys()):
                problems.append(f"idle slots {sorted(idle)} but evictable {sorted(self._evictable.keys())}")
            if not self._pinned <= {u for u in resident if self._known(u)}:
                problems.append(f"pinned {sorted(self._pinned)} not all registered and in slots")
            if any(n <= 0 for n in self._in_use.values()) or not set(self._in_use) <= resident:
                problems.append(f"in-use counts {dict(self._in_use)} do not match slots")
            if not self._removed <= set(self._in_use):
                problems.append(f"removed uids {sorted(self._removed)} are no longer in use")
            if not set(self._ranks) == set(self._nbytes) == set(self._slot_bytes) or set(self.last_read_s) - set(self._ranks):
                problems.append("per-adapter records (shapes, bytes, read times) disagree")
            for uid in list(self._host.keys()) + list(self._parked):
                if not self._known(uid) or uid in resident:
                    problems.append(f"uid {uid} in host memory but not registered or also in a slot")
            if self._host.currsize != sum(self._nbytes.get(uid, -1) for uid in self._host.keys()):
                problems.append("host tier byte count is off")
            if not resident <= set(self._ranks):
                problems.append("an adapter in a slot is not registered")
            if self._bank.counted_bytes() != self._bank.resident_bytes():
                problems.append(f"counted bytes {self._bank.counted_bytes()} != bytes the slots hold {self._bank.resident_bytes()}")
            if self._accelerator_capacity is not None and self._bank.counted_bytes() > self._accelerator_capacity:
                problems.append("accelerator bytes over the budget")
            return problems

    def snapshot(self) -> CacheSnapshot:
        with self._lock:
            return CacheSnapshot(
                slot_table=self._bank.slot_table(),
                host=tuple(self._host.keys()),
                host_bytes=self._host.currsize,
                in_use=dict(self._in_use),
                pinned=frozenset(self._pinned),
            )

    # -- internals (lock held) ----------------------------------------------------------

    def _make_room(self, nbytes: int) -> None:
        """Evict least recently used adapters to host memory until a slot is free and `nbytes`
        more fit the budget. NoSlotAvailable (nothing evicted) when pins and running requests
        leave no way to make room."""
        capacity = self._accelerator_capacity
        held = self._bank.counted_bytes()
        freed, victims = 0, []
        free_slot = self._bank.has_free_slot()
        for uid in list(self._evictable.keys()):  # least recently used first
            if free_slot and (capacity is None or held - freed + nbytes <= capacity):
                break
            victims.append(uid)
            freed += self._bank.bytes_of(uid)
            free_slot = True
        if not free_slot or (capacity is not None and held - freed + nbytes > capacity):
            raise NoSlotAvailable
        for victim in victims:
            self._evictable.pop(victim)
            weights = self._bank.take_back(victim, self._ranks[victim])
            self._emit("evict", victim, Tier.ACCELERATOR, None)
            self._put_host(victim, weights)

    def _free_slot(self, uid: int) -> None:
        self._evictable.pop(uid, None)
        self._bank.drop(uid)

    def _put_host(self, uid: int, weights: AdapterWeights) -> bool:
        if self._pin_memory:
            weights = weights.to("cpu", pin_memory=True)
        try:
            self._host[uid] = weights
        except ValueError:  # larger than the whole host tier
            self._emit("evict", uid, Tier.HOST, None)
            return False
        for victim in self._host.evicted:
            self._emit("evict", victim, Tier.HOST, None)
        self._host.evicted.clear()
        return True

    def _emit(self, kind: str, uid: int, tier: Tier, seconds: float | None) -> None:
        if self.on_event is not None:
            self.on_event(kind, uid, tier, seconds)


def _template(weights: AdapterWeights) -> AdapterWeights:
    """The adapter's ranks and scales without its data, to read a slot back with."""
    return AdapterWeights(
        {n: ModuleLora(torch.empty(m.rank, 0), torch.empty(0, m.rank), m.scale) for n, m in weights.modules.items()}
    )
