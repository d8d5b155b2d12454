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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns next tokens [batch] and, if any row asked, the model's logprobs of them [batch]."""
    want_logprobs = any(p.return_logprobs for p in params)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    if all(p.greedy and p.repetition_penalty == 1.0 for p in params):
        tokens = logits.argmax(dim=-1)
    else:
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for i, p in enumerate(params):
            row = logits[i].clone()
            if p.repetition_penalty != 1.0:
                apply_repetition_penalty(row, seen[i], p.repetition_penalty)
            if p.greedy:
                tokens[i] = row.argmax()
                continue
            row = filter_top_k_top_p(row / p.temperature, p.top_k, p.top_p)
            tokens[i] = torch.multinomial(row.softmax(-1), 1, generator=generators[i])[0]
    logprobs = raw_logprobs.gather(1, tokens[:, None])[:, 0] if raw_logprobs is not None else None
    return tokens, logprobs
