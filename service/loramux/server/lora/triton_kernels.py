"""The LoRA path as two Triton kernels per layer for the whole batch (`--lora-kernel triton`).

Both read a layer's decode buffer (slot_linear.py): adapters' A rows `a_rows [C, in]` and their
scaled B rows `b_cat [C, out]` side by side, each adapter a run of columns at its own rank.
Every token names its adapter's run by a first column, a rank (0: no adapter here) and a scale:

- `shrink`: h[t, :rank] = A[first : first + rank] @ x[t], float32, zeros past the rank;
- `expand_add`: y[t] = round(y[t] + (h[t, :rank] @ B[first : first + rank]) * scale) in place,
  the scale after the product as peft applies it, the sum in float32 and rounded to y's dtype
  once, as peft's `(result + delta).to(result.dtype)`.

Each token reads only its own adapter's columns (BGMV, as Punica and S-LoRA call it), so a
step costs what its adapters' bytes cost, whatever the number of distinct adapters: no masked
columns, no per-row copies. A token's row of the batch is `token // tokens_per_row`, so the
same launches serve a decode step (one token per row) and a prefill (a padded prompt per row).

Products accumulate in float32 over elementwise products (no tensor-core `dot`, whose inputs
must be 16 wide, and whose float32 mode would be TF32): the arithmetic is float32 like
the eager path's, in a different order, so results agree with it to float32 rounding.

Tested on the CPU with Triton's interpreter (TRITON_INTERPRET=1); on a GPU it is what the
GPU script measures against the eager path before it may become the default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_IN = 64  # input features per shrink iteration
BLOCK_OUT = 64  # output features per expand program


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, first_ptr, rank_ptr, h_ptr, in_features, tokens_per_row, h_width,
                   stride_x, stride_a, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)  # (offsets in 64 bits: tokens x width passes 2^31 in long prefills)
    row = token // tokens_per_row
    first = tl.load(first_ptr + row).to(tl.int64)
    rank = tl.load(rank_ptr + row)
    r = tl.arange(0, BLOCK_R)
    in_rank = r < rank
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        in_k = k < in_features
        x = tl.load(x_ptr + token * stride_x + k, mask=in_k, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + (first + r)[:, None] * stride_a + k[None, :], mask=in_rank[:, None] & in_k[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    tl.store(h_ptr + token * h_width + r, acc, mask=r < h_width)


@triton.jit
def _expand_add_kernel(y_ptr, h_ptr, b_ptr, first_ptr, rank_ptr, scale_ptr, out_features, tokens_per_row, h_width,
                       stride_y, stride_b, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    row = token // tokens_per_row
    first = tl.load(first_ptr + row).to(tl.int64)
    rank = tl.load(rank_ptr + row)
    scale = tl.load(scale_ptr + row)
    r = tl.arange(0, BLOCK_R)
    in_rank = r < rank
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = n < out_features
    h = tl.load(h_ptr + token * h_width + r, mask=in_rank, other=0.0)
    b = tl.load(b_ptr + (first + r)[:, None] * stride_b + n[None, :], mask=in_rank[:, None] & in_n[None, :],
                other=0.0).to(tl.float32)
    delta = tl.sum(b * h[:, None], axis=0) * scale
    y = tl.load(y_ptr + token * stride_y + n, mask=in_n, other=0.0)
    out = y.to(tl.float32) + delta
    tl.store(y_ptr + token * stride_y + n, out.to(y.dtype), mask=in_n)


def _block_rank(max_rank: int) -> int:
    return max(16, triton.next_power_of_2(max(max_rank, 1)))


def shrink(x: torch.Tensor, a_rows: torch.Tensor, first: torch.Tensor, rank: torch.Tensor, max_rank: int,
           tokens_per_row: int) -> torch.Tensor:
    """h [tokens, max_rank] float32 for x [tokens, in]; `first`, `rank` [rows] int32 per row."""
    tokens, in_features = x.shape
    h = torch.empty((tokens, max_rank), dtype=torch.float32, device=x.device)
    if tokens:
        _shrink_kernel[(tokens,)](x, a_rows, first, rank, h, in_features, tokens_per_row, max_rank,
                                  x.stride(0), a_rows.stride(0), BLOCK_R=_block_rank(max_rank), BLOCK_K=BLOCK_IN)
    return h


def expand_add_(y: torch.Tensor, h: torch.Tensor, b_cat: torch.Tensor, first: torch.Tensor, rank: torch.Tensor,
                scale: torch.Tensor, tokens_per_row: int) -> torch.Tensor:
    """y [tokens, out] += (h @ B) * scale of each token's adapter, in place (float32 sum, one
    rounding); `scale` [rows] float32."""
    tokens, out_features = y.shape
    if tokens:
        grid = (tokens, triton.cdiv(out_features, BLOCK_OUT))
        _expand_add_kernel[grid](y, h, b_cat, first, rank, scale, out_features, tokens_per_row, h.shape[1],
                                 y.stride(0), b_cat.stride(0), BLOCK_R=_block_rank(h.shape[1]), BLOCK_N=BLOCK_OUT)
    return y


def lora_add_(y: torch.Tensor, x: torch.Tensor, a_rows: torch.Tensor, b_cat: torch.Tensor, first: torch.Tensor,
              rank: torch.Tensor, scale: torch.Tensor, max_rank: int, tokens_per_row: int) -> torch.Tensor:
    """y [tokens, out] (the base output, contiguous rows) += each token's LoRA delta, two launches."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if y.is_cuda and y.device.index != torch.cuda.current_device():  # Triton launches on the current device
        with torch.cuda.device(y.device):
            h = shrink(x, a_rows, first, rank, max_rank, tokens_per_row)
            return expand_add_(y, h, b_cat, first, rank, scale, tokens_per_row)
    h = shrink(x, a_rows, first, rank, max_rank, tokens_per_row)
    return expand_add_(y, h, b_cat, first, rank, scale, tokens_per_row)


def available(device: torch.device) -> str | None:
    """None when the kernels can run on `device`; else why not."""
    if device.type == "cuda":
        return None
    if triton.knobs.runtime.interpret:
        return None  # Triton's interpreter (TRITON_INTERPRET=1): the CPU, for tests
    return f"the Triton LoRA kernels run on CUDA devices (on {device.type} only under TRITON_INTERPRET=1, for tests)"
