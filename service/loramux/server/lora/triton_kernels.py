"""The LoRA path as Triton kernels for the whole batch (`--lora-kernel triton`).

They read each adapter where its slot holds it (slot_linear.py): A^T `[in, r]` and B^T
`[r, out]`, contiguous at the adapter's own rank, found through a layer's slot tables, which
hold per slot the two tensors' addresses, the rank (0: empty, or not targeting this layer)
and the scale. A batch is routed by one tensor: each row's slot. Nothing is copied per batch
or per step, so loading, evicting or replacing an adapter changes table entries, never what
a captured CUDA graph reads from (engine/graph_step.py). A token's row is
`token // tokens_per_row`, so the same launches serve a decode step (one token per row) and
a prefill (a padded prompt per row):

- `shrink`: h[t, :rank] = A @ x[t], in float32. One launch serves up to three sibling layers
  that read the same input (q/k/v, gate/up: lora/siblings.py), each with its own tables:
  `h [siblings, tokens, width]`.
- `expand_add_`: y[t] = round(y[t] + (h[t, :rank] @ B) * scale) in place, the scale after the
  product as peft applies it, the sum in float32 and rounded to y's dtype once, as peft's
  `(result + delta).to(result.dtype)`.

Each token reads only its own adapter, so a pass costs what its adapters' bytes cost, whatever
the number of distinct adapters: no masked columns, no per-row copies. Two shapes:

- **Decode** (one token per row; BGMV, as Punica and S-LoRA call it): a program per token,
  products accumulated over elementwise products, no `dot` (whose operands must be 16 wide).
- **Prefill** (a prompt per row; SGMV): a program per tile of `BLOCK_T` tokens of one row,
  which share that row's adapter, so a tile loads each block of the adapter's weights once
  for all its tokens and multiplies with `tl.dot` in IEEE float32 (no TF32): the weights are
  read once per tile instead of once per token.

The arithmetic is float32, like the eager path's, in a different order, so results agree with
it to float32 rounding. Tested on the CPU with Triton's interpreter (TRITON_INTERPRET=1) and
compiled for sm_90 and sm_80 by the suite; on a GPU it is what the GPU script measures against
the eager path before it may become the default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from loramux.server.lora.slot_linear import SlotTables

BLOCK_IN = 64  # input features per shrink iteration
BLOCK_OUT = 64  # output features per expand program
MAX_BLOCK_R = 32  # rank columns per decode program (larger ranks: more programs, or a loop)
BLOCK_T = 16  # tokens of one row per prefill tile (tl.dot's operands are at least 16 wide)
BLOCK_R_TILE = 16  # rank columns per prefill tile iteration
MAX_SIBLINGS = 3  # layers one shrink launch serves


@triton.jit
def _sibling(s, p0, p1, p2):
    """The argument of sibling `s` (launches serve up to three layers' tables)."""
    if s == 0:
        p = p0
    elif s == 1:
        p = p1
    else:
        p = p2
    return p


@triton.jit
def _shrink_kernel(x_ptr, a0_ptr, a1_ptr, a2_ptr, r0_ptr, r1_ptr, r2_ptr, slots_ptr, w_ptr, h_ptr,
                   in_features, tokens, tokens_per_row, h_width, stride_x,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """h for one token and BLOCK_R of its adapter's rank columns."""
    token = tl.program_id(0).to(tl.int64)  # (offsets in 64 bits: tokens x width passes 2^31 in long prefills)
    s = tl.program_id(1).to(tl.int64)
    slot = tl.load(slots_ptr + token // tokens_per_row)
    rank = tl.load(_sibling(s, r0_ptr, r1_ptr, r2_ptr) + slot)
    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rank = r < rank
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if tl.program_id(2) * BLOCK_R < rank:
        a_ptr = tl.load(_sibling(s, a0_ptr, a1_ptr, a2_ptr) + slot).to(tl.pointer_type(w_ptr.dtype.element_ty))
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            in_k = k < in_features
            x = tl.load(x_ptr + token * stride_x + k, mask=in_k, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + k[None, :].to(tl.int64) * rank + r[:, None], mask=in_rank[:, None] & in_k[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
        tl.store(h_ptr + (s * tokens + token) * h_width + r, acc, mask=in_rank & (r < h_width))


@triton.jit
def _expand_add_kernel(y_ptr, h_ptr, b_tab, rank_tab, scale_tab, slots_ptr, w_ptr, out_features, tokens_per_row,
                       h_width, stride_y, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    slot = tl.load(slots_ptr + token // tokens_per_row)
    rank = tl.load(rank_tab + slot)
    if rank > 0:  # a row without an adapter here keeps its base output untouched
        b_ptr = tl.load(b_tab + slot).to(tl.pointer_type(w_ptr.dtype.element_ty))
        scale = tl.load(scale_tab + slot)
        n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = n < out_features
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            in_rank = (r < rank) & (r < h_width)
            h = tl.load(h_ptr + token * h_width + r, mask=in_rank, other=0.0)
            b = tl.load(b_ptr + r[:, None].to(tl.int64) * out_features + n[None, :],
                        mask=in_rank[:, None] & in_n[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(b * h[:, None], axis=0)
        delta = acc * scale
        y = tl.load(y_ptr + token * stride_y + n, mask=in_n, other=0.0)
        out = y.to(tl.float32) + delta
        tl.store(y_ptr + token * stride_y + n, out.to(y.dtype), mask=in_n)


@triton.jit
def _shrink_tiles_kernel(x_ptr, a0_ptr, a1_ptr, a2_ptr, r0_ptr, r1_ptr, r2_ptr, slots_ptr, w_ptr, h_ptr,
                         in_features, tokens, tokens_per_row, tiles_per_row, h_width, stride_x,
                         BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """h for BLOCK_T tokens of one row and BLOCK_R of its adapter's rank columns."""
    tile = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    r0 = tl.program_id(2) * BLOCK_R
    row = tile // tiles_per_row
    slot = tl.load(slots_ptr + row)
    rank = tl.load(_sibling(s, r0_ptr, r1_ptr, r2_ptr) + slot)
    if r0 < rank:
        a_ptr = tl.load(_sibling(s, a0_ptr, a1_ptr, a2_ptr) + slot).to(tl.pointer_type(w_ptr.dtype.element_ty))
        t_in_row = (tile % tiles_per_row) * BLOCK_T + tl.arange(0, BLOCK_T)
        in_t = t_in_row < tokens_per_row
        token = row * tokens_per_row + t_in_row
        r = r0 + tl.arange(0, BLOCK_R)
        in_rank = r < rank
        acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            in_k = k < in_features
            x = tl.load(x_ptr + token[:, None] * stride_x + k[None, :], mask=in_t[:, None] & in_k[None, :],
                        other=0.0).to(tl.float32)
            a = tl.load(a_ptr + k[:, None].to(tl.int64) * rank + r[None, :], mask=in_k[:, None] & in_rank[None, :],
                        other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_R]: a block of A^T
            acc = tl.dot(x, a, acc, input_precision="ieee")
        tl.store(h_ptr + (s * tokens + token)[:, None] * h_width + r[None, :], acc,
                 mask=in_t[:, None] & (in_rank & (r < h_width))[None, :])


@triton.jit
def _expand_tiles_kernel(y_ptr, h_ptr, b_tab, rank_tab, scale_tab, slots_ptr, w_ptr, out_features, tokens_per_row,
                         tiles_per_row, h_width, stride_y,
                         BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """y += (h @ B) * scale for BLOCK_T tokens of one row and BLOCK_N outputs."""
    tile = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    row = tile // tiles_per_row
    slot = tl.load(slots_ptr + row)
    rank = tl.load(rank_tab + slot)
    if rank > 0:
        b_ptr = tl.load(b_tab + slot).to(tl.pointer_type(w_ptr.dtype.element_ty))
        scale = tl.load(scale_tab + slot)
        t_in_row = (tile % tiles_per_row) * BLOCK_T + tl.arange(0, BLOCK_T)
        in_t = t_in_row < tokens_per_row
        token = row * tokens_per_row + t_in_row
        n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = n < out_features
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            in_rank = (r < rank) & (r < h_width)
            h = tl.load(h_ptr + token[:, None] * h_width + r[None, :], mask=in_t[:, None] & in_rank[None, :], other=0.0)
            b = tl.load(b_ptr + r[:, None].to(tl.int64) * out_features + n[None, :],
                        mask=in_rank[:, None] & in_n[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(h, b, acc, input_precision="ieee")
        mask = in_t[:, None] & in_n[None, :]
        offsets = token[:, None] * stride_y + n[None, :]
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0)
        out = y.to(tl.float32) + acc * scale
        tl.store(y_ptr + offsets, out.to(y.dtype), mask=mask)


def _block_rank(max_rank: int) -> int:
    return min(MAX_BLOCK_R, max(16, triton.next_power_of_2(max(max_rank, 1))))


def _padded(parts: Sequence) -> list:
    """Three arguments for the kernels' sibling slots (unused ones repeat the first: never read)."""
    if not 1 <= len(parts) <= MAX_SIBLINGS:
        raise ValueError(f"a shrink serves 1 to {MAX_SIBLINGS} layers, not {len(parts)}")
    return list(parts) + [parts[0]] * (MAX_SIBLINGS - len(parts))


def shrink(x: torch.Tensor, tables: Sequence[SlotTables], slots: torch.Tensor, max_rank: int,
           tokens_per_row: int) -> torch.Tensor:
    """h [siblings, tokens, max_rank] float32 for x [tokens, in] (contiguous rows), one launch
    for every sibling layer's `tables`; `slots` [rows]: each row's slot. Entries past a row's
    rank are undefined (the expansion never reads them)."""
    tokens, in_features = x.shape
    siblings = len(tables)
    if any(t.weights.dtype != tables[0].weights.dtype for t in tables):
        raise ValueError("sibling layers must hold their adapters in one dtype")
    h = torch.empty((siblings, tokens, max_rank), dtype=torch.float32, device=x.device)
    if not tokens or not max_rank:
        return h
    a, r = _padded([t.a for t in tables]), _padded([t.rank for t in tables])
    if tokens_per_row == 1:
        block_r = _block_rank(max_rank)
        grid = (tokens, siblings, triton.cdiv(max_rank, block_r))
        _shrink_kernel[grid](x, *a, *r, slots, tables[0].weights, h, in_features, tokens, tokens_per_row, max_rank,
                             x.stride(0), BLOCK_R=block_r, BLOCK_K=BLOCK_IN)
    else:
        tiles = triton.cdiv(tokens_per_row, BLOCK_T)
        grid = ((tokens // tokens_per_row) * tiles, siblings, triton.cdiv(max_rank, BLOCK_R_TILE))
        _shrink_tiles_kernel[grid](x, *a, *r, slots, tables[0].weights, h, in_features, tokens, tokens_per_row, tiles,
                                   max_rank, x.stride(0), BLOCK_T=BLOCK_T, BLOCK_R=BLOCK_R_TILE, BLOCK_K=BLOCK_IN)
    return h


def expand_add_(y: torch.Tensor, h: torch.Tensor, tables: SlotTables, slots: torch.Tensor,
                tokens_per_row: int) -> torch.Tensor:
    """y [tokens, out] += (h @ B) * scale of each token's adapter, in place (float32 sum, one
    rounding); h [tokens, width] (one sibling's part of `shrink`'s)."""
    tokens, out_features = y.shape
    if not tokens or not h.shape[1]:
        return y
    if tokens_per_row == 1:
        grid = (tokens, triton.cdiv(out_features, BLOCK_OUT))
        _expand_add_kernel[grid](y, h, tables.b, tables.rank, tables.scale, slots, tables.weights, out_features,
                                 tokens_per_row, h.shape[1], y.stride(0), BLOCK_R=_block_rank(h.shape[1]),
                                 BLOCK_N=BLOCK_OUT)
    else:
        tiles = triton.cdiv(tokens_per_row, BLOCK_T)
        grid = ((tokens // tokens_per_row) * tiles, triton.cdiv(out_features, BLOCK_OUT))
        _expand_tiles_kernel[grid](y, h, tables.b, tables.rank, tables.scale, slots, tables.weights, out_features,
                                   tokens_per_row, tiles, h.shape[1], y.stride(0), BLOCK_T=BLOCK_T,
                                   BLOCK_R=BLOCK_R_TILE, BLOCK_N=BLOCK_OUT)
    return y


def on_device(device: torch.device):
    """A context where Triton launches go to `device` (it launches on the current one)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def available(device: torch.device) -> str | None:
    """None when the kernels can run on `device`; else why not."""
    if device.type == "cuda":
        return None
    if triton.knobs.runtime.interpret:
        return None  # Triton's interpreter (TRITON_INTERPRET=1): the CPU, for tests
    return f"the Triton LoRA kernels run on CUDA devices (on {device.type} only under TRITON_INTERPRET=1, for tests)"
