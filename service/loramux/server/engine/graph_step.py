"""`--cuda-graphs`: the decode step replayed as CUDA graphs, one per shape bucket.

A decode step on a GPU is launch- and Python-bound (docs/benchmarks.md, "On a GPU"): a graph
replays its kernels without Python or launch overhead. A graph replays fixed shapes and fixed
addresses, so everything a step reads lives in buffers made once, whose values are set
before each replay:

- **Shapes**: the batch's rows are rounded up to a rows bucket (1, 2, 4, 8, then multiples of
  8 up to max_batch_size) and the KV width to a width bucket (powers of two from 64 up to the
  static row's positions). The extra rows are padding: no adapter, the pad token, length 0,
  writing their key and value at position 0 of pool rows no running row holds (finite values
  behind every real row's mask; a later join overwrites them). The extra positions are
  masked for every row, so the result is the unpadded step's.
- **The KV cache** is the static pool (`--kv-cache static`): its rows never move in memory.
- **LoRA** runs as the Triton kernels (`--lora-kernel triton`), which read each row's slot
  from one buffer (`LoraRouting.graph`), written from the host once per batch composition,
  and each adapter through its layer's slot tables (addresses, ranks and scales, changed in
  place when a slot is filled or cleared). Loading, evicting and replacing adapters and
  changing compositions change values only: a bucket is captured once.
- A graph is captured the first time its (rows, width, with or without LoRA) bucket is met, on
  the engine thread, and kept; all graphs share one memory pool.

Prefill, batches with a DoRA adapter (its gains are not in the kernels) and batches beyond the
buckets run eagerly. Sampling runs after the replay, on the logits of the real rows.

On the CPU there are no CUDA graphs; tests replay by calling the same step (`Capture.CALL`),
which reads the same buffers, so what each replay computes is checked there.
"""

from __future__ import annotations

import enum
import logging
import time

import torch

from loramux.server.engine.kv_cache import RowCache, StaticKvPool
from loramux.server.lora.slot_linear import GraphRouting, RoutingPlan
from loramux.server.model.base_model import BaseModel

log = logging.getLogger(__name__)

WARM_RUNS = 2  # eager runs on a side stream before a capture (Triton compiles its kernels then)
MIN_WIDTH = 64


class Capture(enum.Enum):
    CUDA = "cuda"  # torch.cuda.CUDAGraph
    CALL = "call"  # tests on the CPU: a replay calls the step again


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, up to and including max_rows."""
    buckets = [b for b in (1, 2, 4) if b < max_rows] + list(range(8, max_rows, 8)) + [max_rows]
    return sorted(set(buckets))


def width_buckets(max_width: int) -> list[int]:
    """Powers of two from MIN_WIDTH, up to and including max_width."""
    buckets, width = [], MIN_WIDTH
    while width < max_width:
        buckets.append(width)
        width *= 2
    return buckets + [max_width]


def _bucket(buckets: list[int], n: int) -> int | None:
    return next((b for b in buckets if b >= n), None)


class GraphDecode:
    """The decode step over the static KV pool, replayed from graphs (`__call__` as
    CompiledDecode's: routes a plan, returns the logits of the real rows)."""

    def __init__(self, base: BaseModel, pool: StaticKvPool, capture: Capture = Capture.CUDA):
        self.base, self.pool, self.capture = base, pool, capture
        bank = base.bank
        device = base.device
        self.rows = row_buckets(pool.rows)
        self.widths = width_buckets(pool.tokens)
        rows, width = self.rows[-1], self.widths[-1]
        # The step's inputs, as buffers every graph reads slices of.
        self._ids = torch.full((rows, 1), base.pad_token_id, dtype=torch.long, device=device)
        self._positions = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self._span = torch.arange(width, device=device)
        self._masks = {w: pool.step_mask(torch.zeros((rows, w), dtype=torch.bool, device=device)) for w in self.widths}
        self._slots = torch.full((rows,), bank.base_slot, dtype=torch.long, device=device)
        self._routed: RoutingPlan | None = None  # the plan whose rows' slots _slots holds
        self._dora: tuple | None = None  # (plan, generation, whether it has a DoRA adapter)
        self._graphs: dict[tuple[int, int, bool], tuple[object, torch.Tensor]] = {}
        self._failed: set[tuple[int, int, bool]] = set()  # buckets whose capture failed: eager from then on
        self._pool_handle = torch.cuda.graph_pool_handle() if capture is Capture.CUDA else None
        self.captured = 0  # graphs captured so far
        self.capture_log: list[tuple[int, int, bool]] = []  # every capture's key, in order
        self.replays = 0
        self.eager_steps = 0

    def warm(self) -> None:
        """Graphs are captured as their buckets are first met (nothing to compile up front)."""

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, inputs: dict,
                 plan: RoutingPlan | None) -> torch.Tensor:
        n = input_ids.shape[0]
        width = inputs["attention_mask"].shape[-1]
        rows, widths = _bucket(self.rows, n), _bucket(self.widths, width)
        lora = plan is not None
        bucket = (rows, widths, lora)
        if rows is None or widths is None or bucket in self._failed or (lora and self._has_dora(plan)):
            return self._eager(input_ids, positions, inputs, plan)
        self._load(input_ids, positions, n, rows, widths)
        if lora:
            self._route(plan)
        graph = self._graphs.get(bucket)
        if graph is None:
            graph = self._capture(bucket)
            if graph is None:
                return self._eager(input_ids, positions, inputs, plan)
        replay, logits = graph
        replay()
        self.replays += 1
        # A view of the graph's output, which the next replay of any graph may overwrite (they
        # share one memory pool): the batch samples from it before the next step.
        return logits[:n]

    # -- internals ------------------------------------------------------------------------

    def _load(self, input_ids, positions, n: int, rows: int, width: int) -> None:
        """The real rows' tokens, positions and masks into the buffers; padding rows after them."""
        self._ids[:n].copy_(input_ids)
        self._ids[n:rows].fill_(self.base.pad_token_id)
        self._positions[:n].copy_(positions)
        self._positions[n:rows].zero_()
        seen = self._span[None, :width] <= self._positions[:rows]  # [rows, width]: a row's own positions
        self._masks[width][:rows].copy_(self.pool.step_mask(seen))

    def _route(self, plan: RoutingPlan) -> None:
        """The plan's rows' slots into the buffer (padding rows: the base slot), when the plan
        changed since they were written (a slot's weights are the tables' business)."""
        if self._routed is plan:
            return
        self._slots[: plan.rows].copy_(plan.row_slots)
        self._slots[plan.rows:].fill_(self.base.bank.base_slot)
        self._routed = plan

    def _has_dora(self, plan: RoutingPlan) -> bool:
        generation = self.base.bank.routing.generation
        if self._dora is None or self._dora[0] is not plan or self._dora[1] != generation:
            self._dora = (plan, generation, self.base.bank.has_dora(plan))
        return self._dora[2]

    def _step(self, rows: int, width: int, lora: bool):
        """The step over buffer slices of one bucket, as a function of nothing."""
        bank = self.base.bank
        cache = RowCache(self.pool)
        cache.lengths = self._positions[:rows, 0]
        cache.mask = self._masks[width][:rows]
        routing = GraphRouting(self._slots[:rows], bank.max_rank, lora)
        ids, positions = self._ids[:rows], self._positions[:rows]

        def step() -> torch.Tensor:
            bank.routing.graph = routing
            try:
                return self.base.model(input_ids=ids, position_ids=positions, attention_mask=cache.mask, cache=cache,
                                       use_cache=True, logits_to_keep=1).logits
            finally:
                bank.routing.graph = None
                bank.release_siblings()
        return step

    def _capture(self, key: tuple[int, int, bool]):
        rows, width, lora = key
        step = self._step(rows, width, lora)
        started = time.monotonic()
        try:
            if self.capture is Capture.CALL:
                logits = step()
                graph = (lambda: logits.copy_(step())), logits
            else:
                graph = self._capture_cuda(step)
        except Exception as e:  # noqa: BLE001 - this bucket runs eagerly from now on
            log.warning("capturing the decode step of %d rows over %d positions%s failed (%s: %s); it runs eagerly",
                        rows, width, " with LoRA" if lora else "", type(e).__name__, e)
            self._failed.add((rows, width, lora))
            return None
        self._graphs[key] = graph
        self.captured += 1
        self.capture_log.append(key)
        log.info("captured the decode step of %d rows over %d positions%s in %.0f ms", rows, width,
                 " with LoRA" if lora else "", (time.monotonic() - started) * 1000)
        return graph

    def _capture_cuda(self, step):
        device = self.base.device
        with torch.cuda.device(device):  # the graph's stream and the model's kernels on the model's device
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            try:
                with torch.cuda.stream(side):
                    for _ in range(WARM_RUNS):
                        step()
            finally:
                torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool_handle, capture_error_mode="thread_local"):
                logits = step()
        return graph.replay, logits

    def _eager(self, input_ids, positions, inputs, plan) -> torch.Tensor:
        self.eager_steps += 1
        bank = self.base.bank
        bank.route(plan, 1)
        try:
            return self.base.model(input_ids=input_ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                                   **inputs).logits
        finally:
            bank.route(None)
