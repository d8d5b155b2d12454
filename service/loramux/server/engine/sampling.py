"""Turn a batch's next-token logits into tokens, all rows at once, each with its own parameters.

The order follows transformers' generate, with vLLM's additions where vLLM applies them:
a structured-output row's mask (tokens that would break its constraint), logit bias, the minimum length (EOS and stop tokens masked), repetition, presence and
frequency penalties, then (sampled rows) temperature, top-k, top-p, min-p and sampling, or
argmax for greedy rows. Log-probabilities (and the top alternatives) are the model's own,
before any of these, as OpenAI and vLLM return them. Every step is one
tensor operation over the rows that need it; the only per-row Python work is drawing each
sampled row's random number from its own generator, which keeps a seeded row reproducible
whatever else shares its batch. The generators live on the host whatever the model's device:
a step's draws are made there and sent to the device in one copy from pinned memory (one
operator on the device's queue, not one per sampled row), and a seed draws the same numbers
on a CPU and a GPU.

Sampling draws one uniform number per row and takes the token where the row's cumulative
probability reaches it (inverse CDF): the same distribution as `torch.multinomial`.

Nothing here waits for the device: no value is read back and no shape depends on the data
(rows whose scores are not finite come back as a mask, not a list), so on a GPU every
operator queues behind the forward pass and the step's one read-back is its caller's.
"""

from __future__ import annotations

import torch

from loramux.server.engine.request import SamplingParams


def new_generator(params: SamplingParams) -> torch.Generator | None:
    """A sampled row's own random numbers (on the host; `_draws`), seeded by its request or not."""
    if params.greedy:
        return None
    gen = torch.Generator()
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


class BatchParams:
    """The rows' sampling parameters as tensors, built once per batch composition."""

    def __init__(self, params: list[SamplingParams], generators: list[torch.Generator | None], device: torch.device,
                 stop_ids: list[frozenset[int]] | None = None):
        """`stop_ids`: each row's tokens that end it (EOS and stop_token_ids), masked until
        its min_tokens are generated."""
        self.generators = generators
        self.top_logprobs = max((p.top_logprobs for p in params), default=0)
        self.want_logprobs = any(p.return_logprobs for p in params) or self.top_logprobs > 0
        self.all_greedy_plain = all(p.greedy and p.repetition_penalty == 1.0 and not p.counts_output and not p.logit_bias
                                    and not p.min_tokens for p in params)
        # [n, 1] each, or None when no row uses them
        self.presence = _column([p.presence_penalty for p in params], 0.0, device)
        self.frequency = _column([p.frequency_penalty for p in params], 0.0, device)
        pairs = [(i, token, bias) for i, p in enumerate(params) for token, bias in p.logit_bias]
        self.bias = None if not pairs else (  # ([k] rows, [k] token ids, [k] float32 biases)
            torch.tensor([r for r, _, _ in pairs], dtype=torch.long, device=device),
            torch.tensor([t for _, t, _ in pairs], dtype=torch.long, device=device),
            torch.tensor([b for _, _, b in pairs], dtype=torch.float32, device=device))
        stops = [(i, token, p.min_tokens) for i, p in enumerate(params) if p.min_tokens
                 for token in sorted((stop_ids or [frozenset()] * len(params))[i])]
        self.min_length = None if not stops else (  # ([k] rows, [k] token ids, [k] min_tokens)
            torch.tensor([r for r, _, _ in stops], dtype=torch.long, device=device),
            torch.tensor([t for _, t, _ in stops], dtype=torch.long, device=device),
            torch.tensor([m for _, _, m in stops], dtype=torch.long, device=device))
        penalties = [p.repetition_penalty for p in params]
        self.penalty = (
            torch.tensor(penalties, dtype=torch.float32, device=device)[:, None] if any(x != 1.0 for x in penalties) else None
        )  # [n, 1] or None
        self.sampled = [i for i, p in enumerate(params) if not p.greedy]
        self.greedy = [i for i, p in enumerate(params) if p.greedy]
        if self.sampled:
            chosen = [params[i] for i in self.sampled]
            self.sampled_index = torch.tensor(self.sampled, dtype=torch.long, device=device)  # [m]
            self.temperature = torch.tensor([p.temperature for p in chosen], dtype=torch.float32, device=device)[:, None]
            self.top_k = [p.top_k for p in chosen]  # 0: off
            vocab_ks = [k if k > 0 else 1 << 62 for k in self.top_k]  # (clamped to the vocabulary when used)
            self.top_k_column = torch.tensor(vocab_ks, dtype=torch.long, device=device)[:, None]  # [m, 1]
            # [m, 1]; a row without top-p gets infinity, so that rounding in the cumulative sum never drops a token
            self.top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in chosen], device=device)[:, None]
            self.any_top_p = any(p.top_p < 1.0 for p in chosen)
            self.any_top_k = any(p.top_k > 0 for p in chosen)
            self.min_p = _column([p.min_p for p in chosen], 0.0, device)  # [m, 1] or None


def _draws(batch: BatchParams, device: torch.device) -> torch.Tensor:
    """One uniform number in [0, 1) per sampled row [m] from the row's own generator
    (reproducible per seed), drawn on the host and copied to `device` without waiting for its
    queue (from pinned memory, which the caching host allocator keeps until the copy is done)."""
    draws = torch.stack([torch.rand((), generator=batch.generators[i]) for i in batch.sampled])
    if device.type != "cuda":
        return draws.to(device)
    return draws.pin_memory().to(device, non_blocking=True)


def _column(values: list[float], off: float, device: torch.device) -> torch.Tensor | None:
    """values as a float32 column [n, 1], or None when every row has `off`."""
    if all(v == off for v in values):
        return None
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """logits [n, V]; seen [n, V] bool (tokens in the prompt or output); penalty [n, 1]."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: torch.Tensor, any_top_p: bool,
                       top_k_column: torch.Tensor | None = None) -> torch.Tensor:
    """logits [m, V] (already divided by temperature): tokens outside each row's top k, or outside
    its nucleus, get -inf. Ties with the k-th value are kept, as transformers' TopKLogitsWarper does;
    at least one token is always kept. `top_k_column`: top_k as a [m, 1] tensor on the device
    (BatchParams makes it once per composition; None: made here)."""
    vocab = logits.shape[-1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    if any_top_p:
        ordered, order = torch.sort(logits, dim=-1, descending=True)  # [m, V]
    else:
        ordered, order = torch.topk(logits, max(ks), dim=-1)  # only as far as the largest k
    if any(k < vocab for k in ks):
        if top_k_column is None:
            top_k_column = torch.tensor(ks, device=logits.device)[:, None]
        kth = ordered.gather(1, top_k_column.clamp(max=min(vocab, ordered.shape[-1])) - 1)  # [m, 1]
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    if any_top_p:
        probs = ordered.softmax(-1)
        # Drop a token once the mass before it already covers top_p (the first is always kept).
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, ordered)


def adjust(logits: torch.Tensor, batch: BatchParams, seen: torch.Tensor | None, counts: torch.Tensor | None,
           generated: torch.Tensor | None) -> torch.Tensor:
    """The scores every row chooses from: logit bias, the minimum length, then the
    repetition, presence and frequency penalties, each one tensor operation for all rows.
    seen [n, V] bool (prompt and output); counts [n, V] float32 (output only); generated [n]
    tokens so far (with min_tokens)."""
    scores = logits
    if batch.bias is not None:
        rows, ids, values = batch.bias
        scores = scores.index_put((rows, ids), values, accumulate=True)
    if batch.min_length is not None:
        rows, ids, least = batch.min_length
        blocked = torch.where(generated.index_select(0, rows) < least, float("-inf"), 0.0)
        scores = scores.index_put((rows, ids), blocked, accumulate=True)
    if batch.penalty is not None:
        scores = apply_repetition_penalty(scores, seen, batch.penalty)
    if batch.frequency is not None:
        scores = scores - batch.frequency * counts
    if batch.presence is not None:
        scores = scores - batch.presence * (counts > 0)
    return scores


def choose_tokens(
    logits: torch.Tensor,  # [n, V] float32
    batch: BatchParams,
    seen: torch.Tensor | None,  # [n, V] bool, needed when a row has a repetition penalty
    counts: torch.Tensor | None = None,  # [n, V] float32 output token counts, with presence/frequency penalties
    generated: torch.Tensor | None = None,  # [n] tokens generated so far, with min_tokens
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None,  # structured output: (rows [k], allowed tokens [k, V] bool)
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Returns next tokens [n], the model's logprobs of them [n] if any row asked (before any
    constraint's mask, as the model gave them), which rows' scores were not finite ([n] bool:
    their tokens are meaningless, those rows must end), and the top alternatives
    `(logprobs [n, k], ids [n, k])` when a row asked for k. Every operation is row by row, so
    a bad row never stops the others from getting their tokens, and nothing is read back."""
    bad = ~torch.isfinite(logits).all(dim=-1)  # [n]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.want_logprobs else None
    top = raw_logprobs.topk(batch.top_logprobs, dim=-1) if batch.top_logprobs else None
    if allowed is not None:  # tokens that would break a row's constraint cannot be chosen
        rows, mask = allowed
        logits = logits.index_put((rows,), logits.index_select(0, rows).masked_fill(~mask, float("-inf")))
    if batch.all_greedy_plain:
        tokens = logits.argmax(dim=-1)
    else:
        scores = adjust(logits, batch, seen, counts, generated)
        tokens = scores.argmax(dim=-1)  # right for greedy rows; sampled rows are overwritten below
        if batch.sampled:
            sampled, unusable = _sample(scores.index_select(0, batch.sampled_index), batch)
            tokens = tokens.index_copy(0, batch.sampled_index, sampled)
            bad = bad.index_copy(0, batch.sampled_index, bad.index_select(0, batch.sampled_index) | unusable)
    logprobs = raw_logprobs.gather(1, tokens[:, None])[:, 0] if raw_logprobs is not None else None
    return tokens, logprobs, bad, (tuple(top) if top is not None else None)


def distribution(scores: torch.Tensor, batch: BatchParams) -> torch.Tensor:
    """scores [m, V] of the sampled rows (penalised) -> the probabilities they sample from [m, V]."""
    scores = scores / batch.temperature
    if batch.any_top_k or batch.any_top_p:
        scores = filter_top_k_top_p(scores, batch.top_k, batch.top_p, batch.any_top_p, batch.top_k_column)
    probs = scores.softmax(-1)
    if batch.min_p is not None:  # drop tokens below min_p x the row's most likely one (0: keeps all)
        probs = probs.masked_fill(probs < batch.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def _sample(scores: torch.Tensor, batch: BatchParams) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [m, V] of the sampled rows -> tokens [m], and which rows (of m) have an unusable
    distribution ([m] bool)."""
    probs = distribution(scores, batch)  # [m, V]
    cdf = probs.cumsum(-1)
    total = cdf[:, -1]
    usable = torch.isfinite(total) & (total > 0)
    draws = _draws(batch, scores.device)
    target = (draws * total.clamp(min=0)).unsqueeze(1)  # [m, 1]
    tokens = torch.searchsorted(cdf.contiguous(), target, right=True)[:, 0].clamp(max=scores.shape[-1] - 1)
    # A token of zero probability can only be hit by rounding (at the very end, or where a
    # GPU's parallel scan makes the cumulative sum rise over one): the last possible token
    # instead, chosen for every row without asking which rows need it (no read-back).
    hit_zero = probs.gather(1, tokens[:, None])[:, 0] == 0
    positions = torch.arange(probs.shape[-1], device=probs.device)
    last_possible = torch.where(probs > 0, positions, -1).amax(dim=-1).clamp(min=0)
    return torch.where(hit_zero, last_possible, tokens), ~usable
