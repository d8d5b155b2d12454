"""Run one padded batch of requests, mixing adapters, from prefill to the last token.

Rows are left-padded to a common length; position ids come from the attention mask so a
padded row computes what it would alone. Each step routes every row to its adapter slot
(the base slot for the base model), picks the next tokens with each row's own parameters,
and sends each row's new tokens out at once. Finished, cancelled and expired rows leave
the batch at the next step: their KV cache rows are dropped.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from transformers import DynamicCache

from loramux.server.base_model import BaseModel
from loramux.server.engine.detokenizer import Detokenizer
from loramux.server.engine.request import (
    ErrorEvent,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    Timings,
    TokenEvent,
)
from loramux.server.engine.sampling import choose_tokens, new_generator
from loramux.server.errors import Cancelled, DeadlineExceeded, LoramuxError


@dataclasses.dataclass(eq=False)
class Row:
    request: GenerationRequest
    slot: int  # adapter slot, or the bank's base slot
    max_new_tokens: int  # capped by the model's context length
    detokenizer: Detokenizer
    generator: torch.Generator | None
    seen: torch.Tensor  # [prompt + generated] token ids, for the repetition penalty
    started: float  # time.monotonic() when the batch started
    stop_tokens: frozenset[int]  # the model's EOS ids and the request's stop_token_ids
    generated: int = 0
    first_token_at: float | None = None
    done: bool = False


def run_batch(base: BaseModel, requests: list[tuple[GenerationRequest, int]], on_row_done) -> None:
    """Generate for `requests` ([(request, slot)]) until every row is done.

    `on_row_done(request)` is called once per row, whatever way it ended."""
    started = time.monotonic()
    device = base.device
    rows = []
    for request, slot in requests:
        room = base.max_sequence_length - len(request.prompt_ids)
        rows.append(
            Row(
                request=request,
                slot=slot,
                max_new_tokens=min(request.params.max_new_tokens, room),
                detokenizer=Detokenizer(base.tokenizer, request.params.stop),
                generator=new_generator(request.params, device),
                seen=torch.tensor(request.prompt_ids, dtype=torch.long, device=device),
                started=started,
                stop_tokens=base.eos_token_ids | request.params.stop_token_ids,
            )
        )
    try:
        _decode(base, rows)
    except LoramuxError as e:
        _fail_all(rows, e, on_row_done)
        raise
    except BaseException as e:
        _fail_all(rows, LoramuxError(f"generation failed: {type(e).__name__}: {e}"), on_row_done)
        raise
    finally:
        base.bank.routing.set(None, base.bank.base_slot)
    for row in rows:
        on_row_done(row.request)


@torch.inference_mode()
def _decode(base: BaseModel, rows: list[Row]) -> None:
    device = base.device
    longest = max(len(r.request.prompt_ids) for r in rows)
    input_ids = torch.full((len(rows), longest), base.pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), longest), dtype=torch.long, device=device)  # [batch, seq]
    for i, row in enumerate(rows):
        n = len(row.request.prompt_ids)
        input_ids[i, longest - n:] = row.seen
        mask[i, longest - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [batch, seq]
    cache = DynamicCache(config=base.model.config)
    live = [row for row in rows if not _end_early(row)]
    if len(live) < len(rows):
        keep = [i for i, row in enumerate(rows) if row in live]
        input_ids, mask, positions = input_ids[keep], mask[keep], positions[keep]
    base.bank.route([row.slot for row in live], device)
    while live:
        out = base.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1, :].float()  # [batch, vocab]
        tokens, logprobs = choose_tokens(
            logits, [r.request.params for r in live], [r.seen for r in live], [r.generator for r in live]
        )
        token_list = tokens.tolist()
        logprob_list = logprobs.tolist() if logprobs is not None else None
        now = time.monotonic()
        for i, row in enumerate(live):
            _advance(row, token_list[i], logprob_list[i] if logprob_list else None, now, tokens[i : i + 1])
        keep = [i for i, row in enumerate(live) if not row.done and not _end_early(row)]
        if len(keep) < len(live):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(index)
            mask, positions, tokens = mask[index], positions[index], tokens[index]
            live = [live[i] for i in keep]
            base.bank.route([row.slot for row in live], device)  # only when rows leave
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        positions = positions[:, -1:] + 1
        input_ids = tokens[:, None]


def _advance(row: Row, token: int, logprob: float | None, now: float, token_t: torch.Tensor) -> None:
    request, params = row.request, row.request.params
    row.generated += 1
    if row.first_token_at is None:
        row.first_token_at = now
    if params.repetition_penalty != 1.0:
        row.seen = torch.cat([row.seen, token_t])
    text = row.detokenizer.add(token)
    reason = None
    if row.detokenizer.stopped:
        reason = FinishReason.STOP_SEQUENCE
    elif token in row.stop_tokens:
        reason = FinishReason.STOP_TOKEN
    elif row.generated >= row.max_new_tokens:
        reason = FinishReason.LENGTH
    request.emit(TokenEvent([token], [logprob] if params.return_logprobs else [], text))
    if reason is not None:
        row.done = True
        request.emit(
            FinishEvent(
                text=row.detokenizer.flush(),
                finish_reason=reason,
                prompt_tokens=len(request.prompt_ids),
                completion_tokens=row.generated,
                timings=Timings(
                    queue_wait_s=row.started - request.arrival,
                    time_to_first_token_s=row.first_token_at - request.arrival,
                    total_s=now - request.arrival,
                ),
            )
        )


def _end_early(row: Row) -> bool:
    """Drop a row whose caller went away or whose deadline passed (reporting it once)."""
    if row.done:
        return False
    request = row.request
    error = None
    if request.cancelled:
        error = Cancelled("the request was cancelled")
    elif request.deadline is not None and time.monotonic() > request.deadline:
        error = DeadlineExceeded(f"the deadline passed after {row.generated} generated tokens", generated=row.generated)
    if error is None:
        return False
    row.done = True
    request.emit(ErrorEvent(error))
    return True


def _fail_all(rows: list[Row], error: LoramuxError, on_row_done) -> None:
    for row in rows:
        if not row.done:
            row.done = True
            row.request.emit(ErrorEvent(error))
        on_row_done(row.request)
