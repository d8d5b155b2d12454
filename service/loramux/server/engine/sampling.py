"""Turn a batch's next-token logits into tokens, all rows at once, each with its own parameters.

The order follows transformers' generate: repetition penalty, temperature, top-k, top-p,
then sampling (or argmax for greedy rows, after the repetition penalty). Every step is one
tensor operation over the rows that need it; the only per-row Python work is drawing each
sampled row's random number from its own generator, which keeps a seeded row reproducible
whatever else shares its batch.

Sampling draws one uniform number per row and takes the token where the row's cumulative
probability reaches it (inverse CDF): the same distribution as `torch.multinomial`.
"""

from __future__ import annotations

import torch

from loramux.server.engine.request import SamplingParams


def new_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


class BatchParams:
    """The rows' sampling parameters as tensors, built once per batch composition."""

    def __init__(self, params: list[SamplingParams], generators: list[torch.Generator | None], device: torch.device):
        self.generators = generators
        self.want_logprobs = any(p.return_logprobs for p in params)
        self.all_greedy_plain = all(p.greedy and p.repetition_penalty == 1.0 for p in params)
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
            # [m, 1]; a row without top-p gets infinity, so that rounding in the cumulative sum never drops a token
            self.top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in chosen], device=device)[:, None]
            self.any_top_p = any(p.top_p < 1.0 for p in chosen)
            self.any_top_k = any(p.top_k > 0 for p in chosen)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """logits [n, V]; seen [n, V] bool (tokens in the prompt or output); penalty [n, 1]."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: torch.Tensor, any_top_p: bool) -> torch.Tensor:
    """logits [m, V] (already divided by temperature): tokens outside each row's top k, or outside
    its nucleus, get -inf. Ties with the k-th value are kept, as transformers' TopKLogitsWarper does;
    at least one token is always kept."""
    vocab = logits.shape[-1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    if any_top_p:
        ordered, order = torch.sort(logits, dim=-1, descending=True)  # [m, V]
    else:
        ordered, order = torch.topk(logits, max(ks), dim=-1)  # only as far as the largest k
    if any(k < vocab for k in ks):
        kth = ordered.gather(1, torch.tensor(ks, device=logits.device)[:, None] - 1)  # [m, 1]
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    if any_top_p:
        probs = ordered.softmax(-1)
        # Drop a token once the mass before it already covers top_p (the first is always kept).
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, ordered)


def choose_tokens(
    logits: torch.Tensor,  # [n, V] float32
    batch: BatchParams,
    seen: torch.Tensor | None,  # [n, V] bool, needed when a row has a repetition penalty
) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """Returns next tokens [n], the model's logprobs of them [n] if any row asked, and the rows
    whose scores were not finite (their tokens are meaningless: those rows must end). A bad row
    never stops the others from getting their tokens."""
    finite = torch.isfinite(logits).all(dim=-1)  # [n]
    bad = [] if bool(finite.all()) else (~finite).nonzero()[:, 0].tolist()
    if bad:
        logits = logits.masked_fill(~finite[:, None], 0.0)  # any token will do for rows that end
    raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.want_logprobs else None
    if batch.all_greedy_plain:
        tokens = logits.argmax(dim=-1)
    else:
        scores = logits if batch.penalty is None else apply_repetition_penalty(logits, seen, batch.penalty)
        tokens = scores.argmax(dim=-1)  # right for greedy rows; sampled rows are overwritten below
        if batch.sampled:
            sampled, more_bad = _sample(scores.index_select(0, batch.sampled_index), batch)
            tokens = tokens.index_copy(0, batch.sampled_index, sampled)
            bad = sorted(set(bad) | {batch.sampled[j] for j in more_bad})
    logprobs = raw_logprobs.gather(1, tokens[:, None])[:, 0] if raw_logprobs is not None else None
    return tokens, logprobs, bad


def distribution(scores: torch.Tensor, batch: BatchParams) -> torch.Tensor:
    """scores [m, V] of the sampled rows (penalised) -> the probabilities they sample from [m, V]."""
    scores = scores / batch.temperature
    if batch.any_top_k or batch.any_top_p:
        scores = filter_top_k_top_p(scores, batch.top_k, batch.top_p, batch.any_top_p)
    return scores.softmax(-1)


def _sample(scores: torch.Tensor, batch: BatchParams) -> tuple[torch.Tensor, list[int]]:
    """scores [m, V] of the sampled rows -> tokens [m], and the rows (of m) whose distribution is unusable."""
    probs = distribution(scores, batch)  # [m, V]
    cdf = probs.cumsum(-1)
    total = cdf[:, -1]
    usable = torch.isfinite(total) & (total > 0)
    # One uniform number per row, from the row's own generator (reproducible per seed).
    draws = torch.stack([torch.rand((), generator=batch.generators[i], device=scores.device) for i in batch.sampled])
    target = (draws * total.clamp(min=0)).unsqueeze(1)  # [m, 1]
    tokens = torch.searchsorted(cdf.contiguous(), target, right=True)[:, 0].clamp(max=scores.shape[-1] - 1)
    # A token of zero probability can only be hit by rounding at the very end: step back to the last possible one.
    hit_zero = probs.gather(1, tokens[:, None])[:, 0] == 0
    if bool(hit_zero.any()):
        last_possible = (probs > 0).cumsum(-1).argmax(-1)
        tokens = torch.where(hit_zero, last_possible, tokens)
    bad = [] if bool(usable.all()) else (~usable).nonzero()[:, 0].tolist()
    return tokens, bad
