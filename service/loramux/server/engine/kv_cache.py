"""The running batch's KV cache, two ways (`--kv-cache`).

`PaddedKv` (`dynamic`, the default): text-generation-inference's padded design. Every row
is as wide as the widest; a join left-pads the shorter cache with masked zeros and
concatenates; a step appends one column to every row (transformers' DynamicCache); a leave
selects the remaining rows and trims columns that are padding in all of them. Memory follows
the batch, and the scheduler bounds it with `max_batch_tokens`.

`RowKv` over a `StaticKvPool` (`static`): one preallocated block of positions per batch row,
allocated at start-up, so its memory is counted before the first request:

- the pool holds `rows` rows of `tokens` positions in every layer, keys and values
  `[rows, kv_heads, tokens, head_dim]` on each layer's device and in its dtype (found by
  running one token through the model, so any architecture's layout is read, not guessed);
- the running batch holds pool rows 0..n-1, batch row i in pool row i, each row's tokens at
  positions 0..L_i-1 of its own row (L_i: its length). Rows of different lengths need no
  padding, and nothing is re-concatenated when rows join;
- join: the prefilled rows' keys and values (left-padded in their prefill batch) are copied
  into rows n..n+k-1 at positions 0..p-1, without touching the running rows;
- step: each row writes its new key and value at position L_i of its own row; attention
  reads the first n rows' first W = max L_i + 1 positions, with a mask `[n, 1, 1, W]` of each
  row's own positions;
- leave: a row that leaves is replaced by one moved from the end (one row copy), so the
  batch stays in rows 0..n-1 (the rows' order changes; nothing depends on it). Freed rows are
  zeroed up to the batch's width: a masked position still meets attention's arithmetic,
  and a stale NaN (from a row whose scores overflowed) times a zero weight is NaN.

A request fits a row when its prompt plus max_new_tokens is at most `tokens`
(Engine.submit refuses it otherwise) and it waits while all rows are taken.

Models with sliding-window attention layers (Mistral v0.1, Phi-3, Gemma 2 and 3) are served
with every request's context (prompt plus output) capped at the smallest window
(`base_model.attention_window`): within the window, sliding attention sees every
earlier token, exactly as full attention does, so both designs keep full-attention layers
(`new_dynamic_cache`) and the window never has to drop a key. In the padded layout a row's
own tokens are never further apart than its length, so the sliding mask transformers builds
over the layout hides only padding.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from loramux.server.errors import InvalidSettings


def new_dynamic_cache(config) -> DynamicCache:
    """A DynamicCache for the model whose layers are all full-attention ones (a sliding layer
    would crop its keys to the window; served contexts fit within it: `attention_window`)."""
    cache = DynamicCache(config=config)
    cache.layers = [DynamicLayer() if isinstance(layer, DynamicSlidingWindowLayer) else layer for layer in cache.layers]
    return cache


def static_row_tokens(settings, max_sequence_length: int) -> int:
    """Positions per static KV row: `kv_cache_tokens`, or max_batch_tokens / max_batch_size
    (the same token slots the dynamic cache may reach), within the model's context."""
    tokens = settings.kv_cache_tokens or settings.max_batch_tokens // settings.max_batch_size
    return max(2, min(tokens, max_sequence_length))


class PaddedKv:
    """The padded cache: DynamicCache plus the 2D attention mask over it."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        self.cache = cache
        self._set_mask(mask)  # self.mask: [n, kv + 1] over the cache and the token fed next

    @property
    def width(self) -> int:
        return self.mask.shape[1] - 1

    def model_inputs(self, positions: torch.Tensor) -> dict:
        return {"attention_mask": self.mask, "cache": self.cache}

    def advance(self, positions: torch.Tensor) -> None:
        """One more column of ones (the token just chosen joins the cache at the next pass)."""
        n, width = self.mask.shape
        if width == self._mask_buffer.shape[1]:
            self._set_mask(self.mask)
        self.mask = self._mask_buffer[:, : width + 1]  # the buffer's spare columns are ones already

    def select(self, keep: list[int], positions: torch.Tensor) -> list[int]:
        """Keep rows `keep` (in that order); returns the new order of the old rows."""
        if not keep:
            return keep
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        mask = self.mask[index]
        # Columns that are padding in every row left are dead weight: trim them.
        first = int(mask.any(dim=0).nonzero()[0, 0])
        if first > 0:
            mask = mask[:, first:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]
        self._set_mask(mask)
        return keep

    def join(self, other: PaddedKv, positions: torch.Tensor):
        """Make room for `other`'s rows after these; returns the function that commits the
        join. Everything is built before the commit: if an allocation fails, this cache is
        as it was."""
        length = max(self.width, other.width)
        mine, theirs = length - self.width, length - other.width
        layers = [
            (
                torch.cat([_pad_left(mine_layer.keys, mine), _pad_left(their_layer.keys, theirs)]),
                torch.cat([_pad_left(mine_layer.values, mine), _pad_left(their_layer.values, theirs)]),
            )
            for mine_layer, their_layer in zip(self.cache.layers, other.cache.layers, strict=True)
        ]
        mask = torch.cat([_pad_left(self.mask, mine), _pad_left(other.mask, theirs)])

        def commit() -> None:
            for layer, (keys, values) in zip(self.cache.layers, layers, strict=True):
                layer.keys, layer.values = keys, values
            self._set_mask(mask)
        return commit

    def _set_mask(self, mask: torch.Tensor) -> None:
        """Keep the mask in a buffer with room for more columns, so a step writes one column
        instead of copying the whole mask."""
        n, width = mask.shape
        self._mask_buffer = mask.new_ones((n, width + _MASK_HEADROOM))
        self._mask_buffer[:, :width] = mask
        self.mask = self._mask_buffer[:, :width]


_MASK_HEADROOM = 64  # mask columns kept ready beyond the current width


class StaticKvPool:
    """The preallocated keys and values of `--kv-cache static`, for `rows` rows of `tokens`
    positions each, in every layer."""

    def __init__(self, model: torch.nn.Module, rows: int, tokens: int, pad_token_id: int, device: torch.device):
        self.rows, self.tokens = rows, tokens
        probe = new_dynamic_cache(model.config)
        with torch.inference_mode():
            model(input_ids=torch.full((1, 1), pad_token_id, dtype=torch.long, device=device),
                  cache=probe, use_cache=True, logits_to_keep=1)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for layer in probe.layers:
            for held, made in ((self.keys, layer.keys), (self.values, layer.values)):
                _, heads, _, dim = made.shape
                held.append(torch.zeros((rows, heads, tokens, dim), dtype=made.dtype, device=made.device))
        # 0..rows-1 on each layer's device, made now (a compiled step must not see the dict change).
        self._indices = {t.device: torch.arange(rows, device=t.device) for t in self.keys}
        # A 4D mask reaches the attention as it is: SDPA takes a boolean one, the eager attention
        # adds it to its scores (0 where seen, the dtype's lowest where hidden).
        eager = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        self._additive = model.get_input_embeddings().weight.dtype if eager else None
        self._check(model, device)

    def step_mask(self, seen: torch.Tensor) -> torch.Tensor:
        """The 4D mask `[n, 1, 1, W]` of a step, from `seen [n, W]` (a row's own positions), in
        the form the model's attention takes it."""
        seen = seen.view(seen.shape[0], 1, 1, -1)
        if self._additive is None:
            return seen
        hidden = torch.finfo(self._additive).min
        return torch.zeros(seen.shape, dtype=self._additive, device=seen.device).masked_fill_(~seen, hidden)

    @torch.inference_mode()
    def _check(self, model: torch.nn.Module, device: torch.device) -> None:
        """One decode step through the pool against the same step over a DynamicCache with a
        2D mask, as the padded cache runs it: two rows of different lengths (2 and 1 tokens),
        so that a position the mask hides is in play. A model that cannot attend through the
        rows' own positions and a 4D mask is refused at start-up instead of failing every
        request (Bloom builds ALiBi biases from a 2D mask) or, worse, answering wrongly."""
        rows = min(2, self.rows)
        lengths = [2, 1][:rows]
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = (torch.arange(rows * 3, device=device).view(rows, 3) * 7 + 1) % vocab
        padded = torch.tensor([[1, 1], [0, 1]][:rows], dtype=torch.long, device=device)  # row 1 left-padded
        prefill = new_dynamic_cache(model.config)
        model(input_ids=ids[:, :2], attention_mask=padded, position_ids=(padded.cumsum(-1) - 1).clamp(min=0),
              cache=prefill, use_cache=True, logits_to_keep=1)
        positions = torch.tensor(lengths, dtype=torch.long, device=device).view(rows, 1)
        cache = RowCache(self)
        cache.lengths = positions[:, 0]
        cache.mask = self.step_mask(torch.arange(3, device=device)[None, :] <= positions)
        try:
            self.load(0, prefill, lengths)
            got = model(input_ids=ids[:, 2:], position_ids=positions, attention_mask=cache.mask, cache=cache,
                        use_cache=True, logits_to_keep=1).logits.float()
            step_mask = torch.cat([padded, torch.ones((rows, 1), dtype=torch.long, device=device)], dim=1)
            want = model(input_ids=ids[:, 2:], position_ids=positions, cache=prefill, use_cache=True, logits_to_keep=1,
                         attention_mask=step_mask).logits.float()
        except Exception as e:
            raise InvalidSettings(f"--kv-cache static does not work with this model ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); serve it with the dynamic cache",
                                  field="kv_cache") from e
        finally:
            self.clear(0, rows, 3)
        tolerance = (1e-4 if self.keys[0].dtype == torch.float32 else 2e-2) * float(want.abs().max())
        difference = float((got - want).abs().max())
        if not difference <= tolerance:
            raise InvalidSettings(f"--kv-cache static computes other scores than the dynamic cache for this model "
                                  f"(a difference of {difference:.3g}); serve it with the dynamic cache", field="kv_cache")

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)

    def row_indices(self, n: int, device: torch.device) -> torch.Tensor:
        """0..n-1 on `device` (a slice of one tensor made once per device)."""
        return self._indices[device][:n]

    @torch.inference_mode()
    def load(self, first: int, cache: DynamicCache, lengths: list[int]) -> None:
        """Copy a prefilled batch's rows (left-padded: row i's tokens are its last lengths[i]
        columns) into rows first.. at positions 0..lengths[i]-1."""
        for layer, keys, values in zip(cache.layers, self.keys, self.values, strict=True):
            width = layer.keys.shape[2]
            for i, length in enumerate(lengths):
                keys[first + i, :, :length] = layer.keys[i, :, width - length:]
                values[first + i, :, :length] = layer.values[i, :, width - length:]

    @torch.inference_mode()
    def move(self, sources: list[int], targets: list[int], width: int) -> None:
        """Copy rows `sources` into rows `targets` (positions 0..width-1)."""
        if not sources:
            return
        for held in (*self.keys, *self.values):
            src = torch.tensor(sources, dtype=torch.long, device=held.device)
            dst = torch.tensor(targets, dtype=torch.long, device=held.device)
            held[dst, :, :width] = held[src, :, :width]

    @torch.inference_mode()
    def clear(self, first: int, last: int, width: int) -> None:
        """Zero rows first..last-1 at positions 0..width-1."""
        if first >= last:
            return
        for held in (*self.keys, *self.values):
            held[first:last, :, :width] = 0


class RowCache:
    """What the model sees as its cache during a step over pool rows 0..n-1: `update` writes
    each row's new key and value at its own length and returns the rows' first W positions
    (W from the mask, so a compiled step keeps it symbolic). Only decode steps (one token per
    row) go through it; prompts are prefilled into a DynamicCache and copied in."""

    def __init__(self, pool: StaticKvPool):
        self.pool = pool
        self.lengths: torch.Tensor | None = None  # [n] each row's length, where its new token goes
        self.mask: torch.Tensor | None = None  # [n, 1, 1, W] the step's attention mask

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions before the step's token in the layout the step attends over (W - 1), what
        models that derive cache positions from the cache (OPT, Bloom) ask for."""
        return self.mask.shape[-1] - 1

    def update(self, key_states, value_states, layer_idx, kwargs=None, **_):
        keys, values = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        n, width = key_states.shape[0], self.mask.shape[-1]
        rows = self.pool.row_indices(n, keys.device)
        lengths = self.lengths.to(keys.device)
        keys[rows, :, lengths] = key_states[:, :, 0]
        values[rows, :, lengths] = value_states[:, :, 0]
        return keys[:n, :, :width], values[:n, :, :width]


class RowKv:
    """The running batch's rows in a StaticKvPool (rows 0..n-1)."""

    def __init__(self, pool: StaticKvPool):
        self.pool = pool
        self.rows = 0
        self._longest = 0  # the longest row's length (tokens in the cache)
        self._cache = RowCache(pool)
        self._positions = torch.arange(pool.tokens + 1, device=pool.keys[0].device)

    @property
    def width(self) -> int:
        return self._longest

    def model_inputs(self, positions: torch.Tensor) -> dict:
        lengths = positions[:, 0]  # a row's position is its length: positions count only its own tokens
        mask = self.pool.step_mask(self._positions[None, : self._longest + 1] <= lengths[:, None])
        self._cache.lengths, self._cache.mask = lengths, mask
        return {"attention_mask": mask, "cache": self._cache}

    def advance(self, positions: torch.Tensor) -> None:
        self._longest += 1

    def select(self, keep: list[int], positions: torch.Tensor) -> list[int]:
        """Keep rows `keep`: rows from the end move into the places of rows that left.
        Returns the new order of the old rows."""
        n = len(keep)
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        order = list(range(n))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        width = self._longest + 1
        self.pool.move(movers, holes, width)
        self.pool.clear(n, self.rows, width)
        self.rows = n
        self._longest = int(positions[order].max()) if n else 0
        return order

    def join(self, other: PaddedKv, positions: torch.Tensor):
        """Copy `other`'s rows into the next free rows; returns the commit. The running rows
        are not touched, so a failure here leaves the batch as it was."""
        first = self.rows
        lengths = [int(v) for v in positions[:, 0].tolist()]
        if first + len(lengths) > self.pool.rows:
            raise RuntimeError(f"the static KV cache has {self.pool.rows} rows; {first} are taken and {len(lengths)} joined")
        try:
            self.pool.load(first, other.cache, lengths)
        except BaseException:
            self.pool.clear(first, first + len(lengths), max(lengths))  # nothing half-copied stays behind
            raise

        def commit() -> None:
            self.rows = first + len(lengths)
            self._longest = max(self._longest, max(lengths))
        return commit


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """Zeros before the sequence dimension's start: dim 2 of KV [n, heads, seq, dim], dim 1 of a mask."""
    if n == 0:
        return t
    dim = 2 if t.dim() == 4 else 1
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)
