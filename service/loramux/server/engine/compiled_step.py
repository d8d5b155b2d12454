"""`--compile`: the decode step as a torch.compile graph, with the batched LoRA path inside.

What changes from step to step must never recompile, so the graph is traced with dynamic
shapes and sees only tensors:

- the rows, the KV width and each slot layer's decode-buffer columns are symbols of the graph
  (duck shaping is off, so two sizes that happen to be equal at tracing are not tied
  together); a column count is at least two (slot_linear.MIN_COLUMNS), and rows = 1 is the one
  size torch specialises, so there are exactly two graphs: one row, and two or more;
- each slot layer takes its columns, row mask, scales and DoRA gains from tensors set before
  the step (`SlotLinear.static_inputs`), computed from the routing plan outside the graph, so
  loading, evicting and swapping adapters and changing the batch's composition only change
  tensor values and sizes;
- the KV cache is either the static rows (kv_cache.RowCache: writes and reads by index, the
  width a symbol) or the padded DynamicCache (its width a symbol too);
- single-token attention over grouped KV heads runs as one SDPA call on the KV heads with the
  query heads folded (`loramux_sdpa`), as transformers does eagerly; its compiled path would
  otherwise copy every key and value per query head, each step.

Prefill stays eager: its shapes (prompt lengths, row groups per adapter) vary too much to
pay for graphs, and it runs once per request. Start-up compiles and runs both graphs
(`warm`), so the first request meets no compilation.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from loramux.server.model.base_model import BaseModel
from loramux.server.engine.kv_cache import RowCache, StaticKvPool, new_dynamic_cache
from loramux.server.errors import InvalidSettings
from loramux.server.lora.slot_linear import RoutingPlan

log = logging.getLogger(__name__)

ATTENTION = "loramux_sdpa"
RECOMPILE_LIMIT = 64  # far above the two graphs: a surprise recompiles (and is logged) instead of falling back to eager


def folded_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, with a single query token over grouped KV heads computed
    on the KV heads (the query's heads folded into its sequence dimension) instead of copying
    the keys and values for every query head."""
    n, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or kv_heads == heads or (attention_mask is not None and attention_mask.shape[1] != 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    folded = query.reshape(n, kv_heads, heads // kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(n, heads, 1, dim).transpose(1, 2), None


class CompiledDecode:
    """The compiled decode step: `__call__` routes a plan and runs the graph."""

    def __init__(self, base: BaseModel, pool: StaticKvPool | None):
        self.base = base
        self.pool = pool
        self.graphs_compiled = 0  # graphs this step has compiled (two after warm(); more would be a recompile)
        self.warm_seconds = 0.0
        attention = base.model.config._attn_implementation
        if attention not in ("sdpa", ATTENTION):
            raise InvalidSettings(f"compile needs the model's sdpa attention; it runs {attention!r}", field="compile")
        AttentionInterface.register(ATTENTION, folded_sdpa)  # (registering again replaces it with itself)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        base.model.set_attn_implementation(ATTENTION)
        self._graph = torch.compile(self._forward, backend=self._backend, dynamic=True, fullgraph=True)

    def _backend(self, graph, example_inputs):
        """Inductor, counting the graphs it compiles (dynamo may hand a graph over twice,
        restarting its analysis when inductor asks; only the compilation that returns counts)."""
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(graph, example_inputs)
        self.graphs_compiled += 1
        return compiled

    def _forward(self, input_ids, positions, attention_mask, cache):
        return self.base.model(input_ids=input_ids, position_ids=positions, attention_mask=attention_mask,
                               cache=cache, use_cache=True, logits_to_keep=1).logits

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, inputs: dict,
                 plan: RoutingPlan | None) -> torch.Tensor:
        bank = self.base.bank
        rows = input_ids.shape[0]
        for layer in bank.layers.values():
            layer.static_inputs(plan, rows)
        cache = inputs["cache"]
        if isinstance(cache, DynamicCache):  # a trimmed padded cache is a view: the graph sees dense tensors only
            for layer in cache.layers:
                if not layer.keys.is_contiguous():
                    layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()
        bank.routing.compiled = True
        try:
            return self._graph(input_ids, positions, _dense(inputs["attention_mask"]), inputs["cache"])
        finally:
            bank.routing.compiled = False

    @staticmethod
    def configure_thread() -> None:
        """torch's compiler settings hold per thread: set them on the thread that runs the
        steps (the engine thread), before the first."""
        import torch._dynamo
        import torch.fx.experimental._config as fx_config

        fx_config.use_duck_shape = False  # independent symbols for sizes equal by chance at tracing
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)

    @torch.inference_mode()
    def warm(self) -> None:
        """On the engine thread: compile and run both graphs (one row; two or more) before
        the first request."""
        self.configure_thread()
        started = time.monotonic()
        for rows in (1, 2):
            try:
                self._warm(rows)
            except InvalidSettings:
                raise
            except Exception as e:  # a model whose forward does not trace as one graph
                raise InvalidSettings(f"compile: this model's decode step does not compile into one graph "
                                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                      "serve it without compile", field="compile") from e
        self.warm_seconds = time.monotonic() - started
        log.info("compiled the decode step: %d graphs in %.1f s", self.graphs_compiled, self.warm_seconds)

    def _warm(self, rows: int) -> None:
        base = self.base
        device = base.device
        tokens = torch.full((rows, 1), base.pad_token_id, dtype=torch.long, device=device)
        # Two tokens already in the cache, so no width is 1 (a size torch would specialise).
        prompt = torch.full((rows, 2), base.pad_token_id, dtype=torch.long, device=device)
        positions = torch.full((rows, 1), 2, dtype=torch.long, device=device)
        prefill = new_dynamic_cache(base.model.config)
        base.model(input_ids=prompt, cache=prefill, use_cache=True, logits_to_keep=1)
        if self.pool is not None:
            self.pool.load(0, prefill, [2] * rows)
            cache = RowCache(self.pool)
            cache.lengths = positions[:, 0]
            cache.mask = self.pool.step_mask(torch.ones((rows, 3), dtype=torch.bool, device=device))
            inputs = {"attention_mask": cache.mask, "cache": cache}
        else:
            inputs = {"attention_mask": torch.ones((rows, 3), dtype=torch.long, device=device), "cache": prefill}
        try:
            self(tokens, positions, inputs, None)
        finally:
            if self.pool is not None:
                self.pool.clear(0, rows, 3)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """`t` laid out with the strides its shape implies (the padded cache's mask is a view of a
    wider buffer; with one row, `contiguous()` would keep the buffer's row stride)."""
    dense = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    if t.stride() == dense.stride():
        return t
    return dense.copy_(t)
