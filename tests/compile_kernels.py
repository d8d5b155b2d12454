"""Compiles the Triton LoRA kernels ahead of time for NVIDIA GPUs, on a machine without one:
Triton lowers them to PTX and its bundled ptxas assembles them for the architecture named,
which catches what the interpreter does not (types, layouts, `tl.dot` shapes, resources).
Run as a program with TRITON_INTERPRET unset (the kernels must be JIT functions); prints one
JSON line per kernel and case."""

from __future__ import annotations

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from loramux.server.lora import triton_kernels as tk

SIBLINGS = ("a0_ptr", "a1_ptr", "a2_ptr", "r0_ptr", "r1_ptr", "r2_ptr")


def cases(x: str, w: str, y: str):
    """(kernel, signature, constexprs) for activations `x`, LoRA weights `w`, base output `y`."""
    tables = {"slots_ptr": "*i64", "w_ptr": f"*{w}"}
    shrink = {"x_ptr": f"*{x}", **{p: "*i64" for p in SIBLINGS}, **tables, "h_ptr": "*fp32",
              "in_features": "i32", "tokens": "i32", "tokens_per_row": "i32"}
    expand = {"y_ptr": f"*{y}", "h_ptr": "*fp32", "b_tab": "*i64", "rank_tab": "*i64", "scale_tab": "*fp32", **tables,
              "out_features": "i32", "tokens_per_row": "i32"}
    for block_r in (16, tk.MAX_BLOCK_R):  # (decode programs: ranks up to 16, and wider ranks in blocks)
        yield (tk._shrink_kernel, {**shrink, "h_width": "i32", "stride_x": "i32"},
               {"BLOCK_R": block_r, "BLOCK_K": tk.BLOCK_IN})
        yield (tk._expand_add_kernel, {**expand, "h_width": "i32", "stride_y": "i32"},
               {"BLOCK_R": block_r, "BLOCK_N": tk.BLOCK_OUT})
    yield (tk._shrink_tiles_kernel, {**shrink, "tiles_per_row": "i32", "h_width": "i32", "stride_x": "i32"},
           {"BLOCK_T": tk.BLOCK_T, "BLOCK_R": tk.BLOCK_R_TILE, "BLOCK_K": tk.BLOCK_IN})
    yield (tk._expand_tiles_kernel, {**expand, "tiles_per_row": "i32", "h_width": "i32", "stride_y": "i32"},
           {"BLOCK_T": tk.BLOCK_T, "BLOCK_R": tk.BLOCK_R_TILE, "BLOCK_N": tk.BLOCK_OUT})


def main() -> int:
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    target = GPUTarget("cuda", arch, 32)
    # (activations, LoRA weights, base output): --lora-dtype float32 on bf16/fp16/fp32 models, and serving.
    for x, w, y in (("fp32", "fp32", "bf16"), ("fp32", "fp32", "fp16"), ("fp32", "fp32", "fp32"),
                    ("bf16", "bf16", "bf16")):
        for kernel, signature, constexprs in cases(x, w, y):
            signature = {**signature, **{name: "constexpr" for name in constexprs}}
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target)
            print(json.dumps({"kernel": kernel.fn.__name__, "arch": arch, "dtypes": [x, w, y],
                              "cubin_bytes": len(compiled.asm["cubin"]), "shared": compiled.metadata.shared}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
