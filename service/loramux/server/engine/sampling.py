"""Turn a batch's next-token logits into tokens, row by row with each row's parameters.

The order follows transformers' generate: repetition penalty, temperature, top-k, top-p,
then sampling (or argmax for greedy rows, after the repetition penalty).
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


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """In place on one row: logits [V], seen [n] token ids so far (prompt and output)."""
    score = logits.gather(0, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    logits.scatter_(0, seen, score)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One row [V]: tokens outside the top k / the nucleus get -inf (at least one is kept)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already covers top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(
    logits: torch.Tensor,  # [batch, V] float32
    params: list[SamplingParams],
    seen: list[torch.Tensor],  # per row: [n] token ids so far
    generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """Returns next tokens [batch], the model's logprobs of them [batch] if any row asked, and
    the rows whose scores were not finite (their tokens are meaningless: those rows must end).
    A bad row never stops the others from getting their tokens."""
    finite = torch.isfinite(logits).all(dim=-1)  # [batch]
    bad = [] if bool(finite.all()) else (~finite).nonzero()[:, 0].tolist()
    if bad:
        logits = logits.masked_fill(~finite[:, None], 0.0)  # any token will do for rows that end
    want_logprobs = any(p.return_logprobs for p in params)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    if all(p.greedy and p.repetition_penalty == 1.0 for p in params):
        tokens = logits.argmax(dim=-1)
    else:
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for i, p in enumerate(params):
            if i in bad:
                tokens[i] = 0
                continue
            row = logits[i].clone()
            if p.repetition_penalty != 1.0:
                apply_repetition_penalty(row, seen[i], p.repetition_penalty)
            if p.greedy:
                tokens[i] = row.argmax()
                continue
            probs = filter_top_k_top_p(row / p.temperature, p.top_k, p.top_p).softmax(-1)
            if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
                bad.append(i)
                tokens[i] = 0
                continue
            tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    logprobs = raw_logprobs.gather(1, tokens[:, None])[:, 0] if raw_logprobs is not None else None
    return tokens, logprobs, sorted(bad)
