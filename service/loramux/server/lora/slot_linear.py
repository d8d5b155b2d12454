"""A Linear that adds a per-row LoRA delta, computed from what the batch actually uses.

For row i of a batch, served by adapter slot s:

    y_i = base(x_i) + scale[s] * (x_i @ A[s]^T) @ B[s]^T

in the order peft computes it (`lora_B(lora_A(x)) * scaling`), with the scale applied in
float32 whatever the serving dtype. The LoRA path has a dtype of its own (Settings.lora_dtype;
float32 by default, as peft upcasts adapters on a 16-bit base): x is cast to it, and the
delta is added to the base output in float32 and rounded to the serving dtype once, as peft's
`(result + delta).to(result.dtype)` does. Rounding the weights, the delta or the sum to
bfloat16 separately costs greedy agreement with the float32 model (measured in
docs/benchmarks.md, "LoRA in 16-bit serving").

Each slot holds its adapter's A^T [in, r] and B^T [r, out] at the adapter's own rank, so
an adapter's memory is its true size; slot S is the empty slot of rows without an adapter.
What a pass computes depends on the batch, and on the torch path on the decode buffer's
layout too (below: it keeps earlier batches' adapters, and the width of the second GEMM's
sum changes its order, so a row's last bits can differ after other traffic):

- **Distinct adapters, true ranks.** A layer keeps a decode buffer holding adapters' A^T
  (as rows) and B^T side by side, each cut to its own rank: `a_rows [columns, in]`, `b_cat [columns, out]`.
  For each batch composition (`RoutingPlan`, built when rows join or leave, not per step) it
  builds a boolean mask `[rows, columns]` of the columns that are not each row's own adapter's.
  A decode step is then two GEMMs, `(x @ a_rows^T).masked_fill(hide, 0) @ b_cat`, and a
  per-row scale applied as the result is added (four operators per layer): each distinct
  adapter's weights are read once per pass at its own rank, with no per-row copies and no
  arithmetic on rank padding. The scale stays after the second GEMM, in peft's order: folding
  it into B (one operator fewer) changed a greedy token against peft in float32 in the suite. The mask overwrites rather than
  multiplies: an adapter's huge-but-finite A can overflow x @ A to inf, and inf * 0 would be
  NaN in every other row of the batch, and in every later batch while its columns sit dead in
  the buffer.
- **Joins copy only what joins.** An adapter is copied into the buffer when a batch first
  uses it (or after its slot was refilled); one whose rows left stays, masked out. Those
  columns are still read by every step, so the buffer is rebuilt from the batch's own
  adapters once the columns read for nothing since the last rebuild add up to the batch's
  live columns (what a rebuild copies): a composition that lasts pays at most about one
  rebuild for what it would otherwise waste, and one that changes every step is not rebuilt
  every step (the ski-rental rule). Placement also rebuilds when columns no batch uses
  outnumber the live ones, so the buffer holds at most about twice the batch's adapters.
- **Untargeted modules cost nothing.** A layer that no adapter in the batch targets is skipped.
- **Prefill** (many tokens per row) with several adapters loops over the distinct adapters'
  row groups instead, so each row's tokens meet only their own adapter's weights (the
  concatenation would multiply every token by every adapter's A).

That is the torch path (`--lora-kernel torch`). The Triton kernels (triton_kernels.py) need no
decode buffer: each layer's slot tables (`SlotTables`: every slot's A^T and B^T address, rank
and scale, made once and changed in place by `fill` and `clear`) let a kernel find a row's
adapter where its slot holds it, so a batch is routed by its rows' slots alone and nothing is
copied when rows join or leave.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from loramux.server.lora.siblings import Siblings


MIN_COLUMNS = 2  # decode buffer columns a compiled step reads at least


@dataclasses.dataclass(eq=False)
class RoutingPlan:
    """Which adapter slot each row of a batch uses, grouped by slot. Built once per composition."""

    slots: list[int]  # per row; the base slot for rows without an adapter
    groups: list[tuple[int, torch.Tensor]]  # (slot, row indices [k] int64) for each distinct adapter slot, in first-use order
    device: torch.device
    row_slots: torch.Tensor | None = None  # [rows] int64, the same as `slots`, on the device
    adapter_bytes: int = 0  # the distinct adapters' weights, each read once per pass

    def __post_init__(self) -> None:
        if self.row_slots is None:
            self.row_slots = torch.tensor(self.slots, dtype=torch.long, device=self.device)
        self._row_slots_on: dict[torch.device, torch.Tensor] = {self.row_slots.device: self.row_slots}

    def row_slots_on(self, device: torch.device) -> torch.Tensor:
        """`row_slots` on `device`, copied once per device (layers placed across devices by
        --device-map share the copy, so siblings there still share one shrink launch)."""
        held = self._row_slots_on.get(device)
        if held is None:
            held = self._row_slots_on[device] = self.row_slots.to(device)
        return held

    @property
    def rows(self) -> int:
        return len(self.slots)


class LoraRouting:
    """The plan of the batch being run; shared by all slot layers of a model. None: no row has
    an adapter, and the layers skip the LoRA arithmetic entirely."""

    def __init__(self) -> None:
        self.plan: RoutingPlan | None = None
        self.generation = 0  # bumped whenever a slot's weights change
        self.compiled = False  # a compiled decode step runs: every layer takes its tensors from `static_inputs`
        self.tokens: int | None = None  # the pass's tokens per row (SlotBank.route); None: not known
        self.graph: GraphRouting | None = None  # a decode step for CUDA graphs runs: layers read only its buffers


@dataclasses.dataclass
class GraphRouting:
    """What every slot layer reads in a decode step meant for a CUDA graph (engine/graph_step.py),
    beside its slot tables: a device buffer whose values change between replays, never its
    address or shape."""

    slots: torch.Tensor  # [rows] int64: each row's slot (padding rows: the base slot)
    max_rank: int  # the widest rank a row may have (the bank's max_rank): fixed for every capture
    lora: bool  # False: no row has an adapter (the base step: no LoRA launch at all)


@dataclasses.dataclass
class _DecodeView:
    """One layer's view of one plan for decode steps: which buffer columns each row uses."""

    hide: torch.Tensor  # [rows, 1, used] bool  True where the column is not the row's adapter's
    scale: torch.Tensor  # [rows, 1, 1] float32  each row's adapter scale (0 for rows without one here)
    used: int  # buffer columns in play
    live: int  # of those, the columns of this plan's adapters
    slots: list[int]  # this plan's adapter slots that this layer serves
    dora: torch.Tensor | None = None  # [rows, 1, out] float32: DoRA scales per row (ones for others); None: no DoRA row


@dataclasses.dataclass(frozen=True)
class KernelRuns:
    """What the Triton kernels read for one layer in one pass, beside its slot tables."""

    slots: torch.Tensor  # [rows] int64: each row's slot (the base slot: no adapter)
    max_rank: int  # the widest rank a row may have here: the width of the shrink's result


@dataclasses.dataclass(frozen=True)
class SlotTables:
    """One layer's adapters as the Triton kernels find them, by slot (the last: no adapter).
    The tensors are made once; filling or clearing a slot changes their values only."""

    a: torch.Tensor  # [slots + 1] int64: the address of each slot's A^T [in, r], contiguous (0: empty)
    b: torch.Tensor  # [slots + 1] int64: the address of each slot's B^T [r, out], contiguous
    rank: torch.Tensor  # [slots + 1] int64: each slot's rank in this layer (0: nothing to add)
    scale: torch.Tensor  # [slots + 1] float32
    weights: torch.Tensor  # an empty tensor of the adapters' dtype (the kernels' pointer type)


@dataclasses.dataclass(frozen=True)
class BufferLayout:
    """A copy of a layer's decode-buffer bookkeeping, for tests and diagnostics."""

    segments: dict[int, tuple[int, int, int]]  # slot -> (first column, rank, version)
    columns: int  # columns written
    wasted: int  # columns steps have read for no row since the last rebuild
    view: _DecodeView | None  # the decode view of the latest plan (the same object while it is reused)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and its kin): a Linear whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _by_rows(forward, x: torch.Tensor, rows: int, tokens: int | None) -> torch.Tensor:
    """`forward` over x as [rows, tokens, in]. Models call their Linears on [rows, seq, in], or
    (OPT's MLP) on the tokens flattened row by row, [rows * seq, in]: those are viewed as rows
    and the output flattened back, so each token still meets its own row's adapter. Any
    other layout (a layer fed a subset of the tokens, such as experts fed the tokens routed to
    them) is refused for the batch, never served with rows' adapters mixed. `tokens`: the
    pass's tokens per row (None: not known, only the row count is checked)."""
    if x.dim() == 3 and x.shape[0] == rows and tokens in (None, x.shape[1]):
        return forward(x)
    if x.dim() == 2 and x.shape[0] % rows == 0 and tokens in (None, x.shape[0] // rows):
        return forward(x.reshape(rows, -1, x.shape[1])).flatten(0, 1)
    raise RuntimeError(f"a slot layer got input {list(x.shape)} for {rows} rows of {tokens} tokens: "
                       "its tokens cannot be told apart by row")


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` runs more than its `forward`: hooks of its own or global ones,
    or accelerate's (which replace `forward` and keep the original in `_old_forward`)."""
    from torch.nn.modules import module as torch_module

    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or hasattr(module, "_hf_hook") or hasattr(module, "_old_forward")
                or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _added(result: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The base output plus a LoRA delta (float32, or the LoRA dtype), summed in the wider of
    the two and rounded to the base output's dtype once (peft: `(result + delta).to(dtype)`)."""
    return (result + delta).to(result.dtype)


class SlotLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, num_slots: int, routing: LoraRouting, dtype: torch.dtype | None = None,
                 kernel: str = "torch"):
        """`base_layer`: an nn.Linear, a quantized Linear, or transformers' Conv1D (its weight
        [in, out]; peft's fan_in_fan_out: the adapter's A and B are shaped as for a Linear, so
        the LoRA path is the same). `dtype`: the LoRA path's (Settings.lora_dtype, float32
        by default, or the serving dtype, which a quantized base layer's weight does not tell).
        `kernel`: torch (the masked GEMMs) or triton (triton_kernels.py: a shrink and an
        expansion per pass, the shrink shared with the layer's siblings, siblings.py)."""
        super().__init__()
        self.base_layer = base_layer
        self.kernel = kernel
        self.siblings: Siblings | None = None  # layers called on the same input, shrunk in one launch (siblings.py)
        self.routing = routing
        self.num_slots = num_slots
        w = base_layer.weight
        self.transposed = is_conv1d(base_layer)  # its weight is [in, out]
        # The checkpoint's weight is [in, out]: a Conv1D, or one bitsandbytes quantized from a Conv1D.
        source_cls = getattr(base_layer, "source_cls", None)
        self.stored_transposed = self.transposed or getattr(source_cls, "__name__", "") == "Conv1D"
        if self.transposed:
            self._in, self._out = w.shape
        else:
            self._in, self._out = base_layer.in_features, base_layer.out_features
        self._dtype, self._device = dtype or w.dtype, w.device
        # Each resident adapter's A^T [in, r] and B^T [r, out] at its true rank, by slot: the
        # memory an adapter holds is its own size, whatever the largest rank served.
        self.a_t: dict[int, torch.Tensor] = {}
        self.b_t: dict[int, torch.Tensor] = {}
        self.ranks = [0] * (num_slots + 1)  # each slot's rank in this layer (0: empty, or its adapter does not target it)
        self.scales = [0.0] * (num_slots + 1)  # float32 scales, kept as Python floats
        self.dora: dict[int, torch.Tensor] = {}  # slot -> DoRA's magnitude / ||W + sBA|| per output row [out]
        self._versions = [0] * (num_slots + 1)  # bumped when a slot is refilled or cleared
        # The decode buffer: adapters' A^T and B^T side by side at true rank, appended as they
        # join a batch and compacted when columns of adapters no batch uses outnumber the rest.
        # A's rows (not A^T's columns), so a slice of the first columns in play is laid out the
        # same whatever the buffer's capacity (a compiled step's strides never change).
        self._a_rows = torch.zeros((0, self._in), dtype=self._dtype, device=self._device)  # [capacity, in]
        self._b_cat = torch.zeros((0, self._out), dtype=self._dtype, device=self._device)  # [capacity, out]
        self._col_slot = torch.full((0,), -1, dtype=torch.long, device=w.device)  # [capacity] slot of each column, -1: dead
        self._segments: dict[int, tuple[int, int, int]] = {}  # slot -> (first column, rank, version)
        self._columns = 0  # columns written
        self._epoch = 0  # bumped when the buffer is compacted
        self._view: tuple[RoutingPlan, int, int, _DecodeView | None] | None = None  # (plan, generation, epoch, view)
        self._wasted = 0  # buffer columns steps have read for no row since the last rebuild
        self._static: tuple[torch.Tensor, ...] | None = None  # what a compiled step reads (static_inputs)
        self._scale_t = torch.zeros(num_slots + 1, dtype=torch.float32, device=w.device)  # [S+1] the scales, float32
        # Where the Triton kernels find each slot's adapter (made once; fill/clear set a slot's
        # column in one copy). An entry changes only for a slot no row of a queued pass uses
        # (the cache fills and empties slots between passes, and on the model's stream).
        self._entries = torch.zeros((3, num_slots + 1), dtype=torch.int64, device=w.device)  # A^T, B^T addresses; rank
        self.tables = SlotTables(self._entries[0], self._entries[1], self._entries[2], self._scale_t,
                                 torch.empty(0, dtype=self._dtype, device=self._device))
        self._kernel_plan: tuple | None = None  # (plan, generation, KernelRuns | None) of the latest pass
        if not _hooked(base_layer):
            self._base_forward = base_layer.forward  # (an instance attribute: no module call per step)

    @property
    def in_features(self) -> int:
        return self._in

    @property
    def out_features(self) -> int:
        return self._out

    @property
    def element_size(self) -> int:
        """Bytes per value of the LoRA path (its dtype)."""
        return torch.empty((), dtype=self._dtype).element_size()

    def resident_bytes(self) -> int:
        """Bytes of the adapters held by this layer (their true sizes; the decode buffer aside)."""
        return sum(t.nbytes for t in self.a_t.values()) + sum(t.nbytes for t in self.b_t.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [rows, seq, in], or the rows' tokens flattened
        routing = self.routing
        if routing.plan is None and not routing.compiled and routing.graph is None:  # no adapter: the layer alone
            return self._base_forward(x)
        if routing.graph is not None:
            return self._graph_forward(x)
        if routing.compiled:
            return self._compiled_forward(x)
        return _by_rows(self._forward_rows, x, routing.plan.rows, routing.tokens)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output. Its own `forward` is called directly when nothing hooks the
        layer (nn.Module's call machinery is most of what a wrapper would add to a step where
        compute vanishes); a hooked layer (accelerate's placement, quantizers) is called whole."""
        return self.base_layer(x)

    def _forward_rows(self, x: torch.Tensor) -> torch.Tensor:  # x: [rows, seq, in]
        plan = self.routing.plan
        result = self._base_forward(x)
        if self.kernel == "triton" and not self._dora_rows(plan):  # (a DoRA adapter's batch takes the torch path)
            runs = self.kernel_runs()
            return result if runs is None else self._kernel_add(result, x, runs, x.shape[1])
        xd = x.to(self._dtype)
        if x.shape[1] > 1:
            # Prefill: each adapter's weights meet only its own rows' tokens.
            for slot, rows in plan.groups:  # groups hold disjoint rows: a group's rows are still the base output
                rank = self.ranks[slot]
                if rank:
                    rows = rows.to(self._device)  # placed across devices (--device-map): this layer's
                    h = xd.index_select(0, rows) @ self.a_t[slot]
                    delta = (h @ self.b_t[slot]).float() * self.scales[slot]  # float32 scale, as decode steps
                    base = result.index_select(0, rows)
                    if slot in self.dora:
                        delta = self._dora_extra(base, delta, self.dora[slot])
                    result.index_copy_(0, rows, _added(base, delta))
            return result
        view = self._step_view(plan)
        if view is None:  # no adapter in the batch targets this layer
            return result
        # [rows, 1, used]: each row keeps its own adapter's columns; the others' are overwritten
        h = torch.nn.functional.linear(xd, self._a_rows[: view.used]).masked_fill_(view.hide, 0)
        raw = h @ self._b_cat[: view.used]  # [rows, 1, out]
        if view.dora is not None:  # a DoRA adapter in the batch: each row's magnitude scale, 1 for the others
            return _added(result, self._dora_extra(result, raw * view.scale, view.dora))
        if result.dtype == torch.float32 and raw.dtype == torch.float32:
            return result.addcmul_(raw, view.scale)  # one operator for scale and sum
        return _added(result, raw * view.scale)  # float32 scale, as peft's Python float

    # -- the decode step for CUDA graphs ------------------------------------------------

    def _graph_forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [rows, 1, in]
        """A decode step that reads nothing but device buffers (`LoraRouting.graph`: each
        row's slot; the slot tables), so that a CUDA graph captured once replays it for any
        batch of its shape and any adapters in the slots: those are values in the buffers."""
        graph = self.routing.graph
        result = self._base_forward(x)
        if not graph.lora:
            return result
        if x.numel() != graph.slots.shape[0] * self._in:  # one token per row, rows in order (as _by_rows checks)
            raise RuntimeError(f"a slot layer got input {list(x.shape)} in a graph of {graph.slots.shape[0]} rows")
        return self._kernel_add(result, x, self.kernel_runs(), 1)

    # -- the Triton kernels (eager and in graphs) ------------------------------------------

    def kernel_runs(self) -> KernelRuns | None:
        """What the kernels read for this layer in the pass being run: each row's slot (its
        adapter through the slot tables) and the widest rank among them. None: no row has an
        adapter here, or a DoRA adapter's row does (the torch path serves that batch)."""
        graph = self.routing.graph
        if graph is not None:
            return KernelRuns(graph.slots, graph.max_rank) if graph.lora else None
        plan, generation = self.routing.plan, self.routing.generation
        held = self._kernel_plan
        if held is None or held[0] is not plan or held[1] != generation:
            widest = max((self.ranks[slot] for slot, _ in plan.groups), default=0)
            runs = None
            if widest and not self._dora_rows(plan):
                runs = KernelRuns(plan.row_slots_on(self._device), widest)  # (placed across devices: this layer's)
            self._kernel_plan = held = (plan, generation, runs)
        return held[2]

    def _dora_rows(self, plan: RoutingPlan) -> bool:
        """Whether a row of the plan has a DoRA adapter on this layer."""
        return bool(self.dora) and any(slot in self.dora for slot, _ in plan.groups)

    def _kernel_add(self, result: torch.Tensor, x: torch.Tensor, runs: KernelRuns, tokens_per_row: int) -> torch.Tensor:
        """result + each token's LoRA delta through the kernels: the shrink (one launch with
        this layer's siblings, or its part of theirs) and the expansion, added in place."""
        from loramux.server.lora import triton_kernels

        result = result.contiguous()  # (a fresh Linear output already is)

        def flat() -> torch.Tensor:
            rows = x.to(self._dtype).reshape(-1, self._in)
            return rows if rows.stride(-1) == 1 else rows.contiguous()

        with triton_kernels.on_device(result.device):
            if self.siblings is not None:
                h = self.siblings.shrunk(self, x, flat, runs, tokens_per_row)
            else:
                h = triton_kernels.shrink(flat(), [self.tables], runs.slots, runs.max_rank, tokens_per_row)[0]
            triton_kernels.expand_add_(result.view(-1, self._out), h, self.tables, runs.slots, tokens_per_row)
        return result

    # -- the compiled decode step ---------------------------------------------------------

    def _compiled_forward(self, x: torch.Tensor) -> torch.Tensor:
        return _by_rows(self._compiled_rows, x, self._static[2].shape[0], 1)

    def _compiled_rows(self, x: torch.Tensor) -> torch.Tensor:
        """One decode step inside a compiled graph: tensors only, the same arithmetic for every
        batch (no branch that a composition could flip, so nothing recompiles). A layer no row
        uses reads two zero columns; every layer applies the DoRA gains (ones for rows of
        plain LoRA adapters and the base)."""
        result = self.base_layer(x)
        a, b, hide, scale, gain = self._static
        delta = (torch.nn.functional.linear(x.to(a.dtype), a).masked_fill(hide, 0) @ b) * scale  # float32 scale, as eager
        bias = self.base_layer.bias
        plain = result if bias is None else result - bias
        return _added(result, (gain - 1) * plain.to(gain.dtype) + gain * delta.to(gain.dtype))

    @torch.no_grad()
    def static_inputs(self, plan: RoutingPlan | None, rows: int) -> None:
        """Set the tensors `_compiled_forward` reads for a step over `plan` (None: no adapter):
        the decode buffer's columns in play (at least two, so their count stays a symbol of the
        graph, never a specialised 0 or 1), the columns each row must not read, each row's
        scale, and its DoRA gains."""
        view = self._step_view(plan) if plan is not None else None
        if view is None:
            columns, hide, scale = MIN_COLUMNS, None, None
        else:
            columns, hide, scale = max(view.used, MIN_COLUMNS), view.hide, view.scale
        self._reserve(columns)
        if hide is None:
            hide = torch.ones((rows, 1, columns), dtype=torch.bool, device=self._device)
            scale = torch.zeros((rows, 1, 1), dtype=torch.float32, device=self._device)
        elif hide.shape[-1] < columns:
            hide = torch.cat([hide, hide.new_ones((rows, 1, columns - hide.shape[-1]))], dim=-1)
        gain = view.dora if view is not None and view.dora is not None else self._ones(rows)
        self._static = (self._a_rows[:columns], self._b_cat[:columns], hide, scale, gain)

    def buffer_layout(self) -> BufferLayout:
        """Where each adapter sits in the decode buffer now, and the view steps read."""
        return BufferLayout(dict(self._segments), self._columns, self._wasted,
                            self._view[3] if self._view is not None else None)

    def _step_view(self, plan: RoutingPlan) -> _DecodeView | None:
        """The plan's decode view for one step, counting the buffer columns the step reads for
        no row, and rebuilding the buffer once that waste has cost a rebuild's copy."""
        view = self._decode_view(plan)
        if view is not None and view.used > view.live:
            self._wasted += view.used - view.live
            if self._wasted >= view.live:
                self._place(view.slots, rebuild=True)
                view = self._decode_view(plan)
        return view

    def _ones(self, rows: int) -> torch.Tensor:
        held = getattr(self, "_ones_held", None)
        if held is None or held.shape[0] < rows:
            held = self._ones_held = torch.ones((rows, 1, self.out_features), dtype=torch.float32, device=self._device)
        return held[:rows]

    @torch.no_grad()
    def _reserve(self, columns: int) -> None:
        """At least `columns` columns in the decode buffer (new ones zero, belonging to no slot)."""
        if columns <= self._a_rows.shape[0]:
            return
        a = self._a_rows.new_zeros((columns, self._a_rows.shape[1]))
        b = self._b_cat.new_zeros((columns, self._b_cat.shape[1]))
        col_slot = self._col_slot.new_full((columns,), -1)
        a[: self._columns] = self._a_rows[: self._columns]
        b[: self._columns] = self._b_cat[: self._columns]
        col_slot[: self._columns] = self._col_slot[: self._columns]
        self._a_rows, self._b_cat, self._col_slot = a, b, col_slot

    def _dora_extra(self, base: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output, as peft computes it: (g - 1) * (base output
        without its bias) + g * (scaled LoRA output), with g = magnitude / ||W + sBA|| per
        output feature (per row here: 1 for rows of plain LoRA adapters and the base)."""
        bias = self.base_layer.bias
        plain = base if bias is None else base - bias
        return (scale - 1) * plain.to(scale.dtype) + scale * delta.to(scale.dtype)

    def _decode_view(self, plan: RoutingPlan) -> _DecodeView | None:
        key = (plan, self.routing.generation, self._epoch)
        if self._view is not None and self._view[0] is plan and self._view[1:3] == key[1:]:
            return self._view[3]
        used = [slot for slot, _ in plan.groups if self.ranks[slot] > 0]
        view = None
        if used:
            self._place(used)
            dora = None
            if any(s in self.dora for s in used):  # per row: its adapter's DoRA scale, or ones
                ones = torch.ones(self.out_features, dtype=torch.float32, device=self._device)
                dora = torch.stack([self.dora.get(s, ones) for s in plan.slots]).unsqueeze(1)
            row_slots = plan.row_slots_on(self._device)  # placed across devices (--device-map): this layer's
            scale = self._scale_t.index_select(0, row_slots).view(-1, 1, 1)
            # One tensor op, however many adapters: a column belongs to a row when their slots agree.
            hide = (row_slots[:, None] != self._col_slot[None, : self._columns]).unsqueeze(1)
            view = _DecodeView(hide, scale, self._columns, sum(self.ranks[s] for s in used), used, dora)
            key = (plan, self.routing.generation, self._epoch)
        self._view = (*key, view)
        return view

    @torch.no_grad()
    def _place(self, slots: list[int], rebuild: bool = False) -> None:
        """Make every slot's current weights present in the decode buffer, copying only those
        that are missing or stale; rebuild from `slots` alone when asked, or when columns no
        batch uses would outnumber the live ones."""
        missing = [s for s in slots if self._segments.get(s, (0, 0, -1))[2] != self._versions[s]]
        if not missing and not rebuild:
            return
        live_columns = sum(self.ranks[s] for s in slots)
        current = sum(r for s, (_, r, v) in self._segments.items() if s in set(slots) and v == self._versions[s])
        if rebuild or self._columns - current > live_columns:
            self._segments, self._columns, self._wasted = {}, 0, 0
            self._col_slot.fill_(-1)
            self._epoch += 1  # views of other plans point at columns that moved
            missing = list(slots)
        need = self._columns + sum(self.ranks[s] for s in missing)
        if need > self._a_rows.shape[0]:
            self._reserve(max(need, 2 * self._a_rows.shape[0]))
        for slot in missing:
            old = self._segments.get(slot)
            if old is not None:  # a stale copy of a refilled slot: its columns are dead from now on
                self._col_slot[old[0] : old[0] + old[1]] = -1
            rank = self.ranks[slot]
            first = self._columns
            self._a_rows[first : first + rank] = self.a_t[slot].T
            self._b_cat[first : first + rank] = self.b_t[slot]
            self._col_slot[first : first + rank] = slot
            self._segments[slot] = (first, rank, self._versions[slot])
            self._columns += rank

    @torch.no_grad()
    def fill(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float, dora: torch.Tensor | None = None) -> None:
        """Hold one adapter's A [r, in] and B [out, r] in `slot`, at rank r (and a DoRA
        adapter's magnitude scale per output feature, float32)."""
        self.clear(slot)
        if dora is not None:
            self.dora[slot] = dora.to(device=self._device, dtype=torch.float32)
        self.a_t[slot] = a.T.to(device=self._device, dtype=self._dtype, non_blocking=True).contiguous()  # [in, r]
        self.b_t[slot] = b.T.to(device=self._device, dtype=self._dtype, non_blocking=True).contiguous()  # [r, out]
        self.ranks[slot] = a.shape[0]
        self.scales[slot] = float(scale)  # (clear() above bumped the slot's version)
        self._scale_t[slot] = float(scale)
        self._entries[:, slot] = torch.tensor([self.a_t[slot].data_ptr(), self.b_t[slot].data_ptr(), a.shape[0]])

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Let go of the slot's weights (their memory goes back to the allocator)."""
        self.routing.generation += 1
        self._entries[:, slot] = 0  # (before the weights go: the kernels never follow an address of rank 0)
        self.a_t.pop(slot, None)
        self.b_t.pop(slot, None)
        self.dora.pop(slot, None)
        self.ranks[slot] = 0
        self.scales[slot] = 0.0
        self._scale_t[slot] = 0.0
        self._versions[slot] += 1

    def read(self, slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The slot's A [r, in], B [out, r] and DoRA scales [out] (None for plain LoRA), as host copies."""
        a = self.a_t[slot].T.to("cpu", copy=True).contiguous()
        b = self.b_t[slot].T.to("cpu", copy=True).contiguous()
        dora = self.dora.get(slot)
        return a, b, None if dora is None else dora.to("cpu", copy=True)
