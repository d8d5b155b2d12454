"""The running batch: rows that decode together, mixing adapters, over one KV cache.

This follows the batch design of text-generation-inference's Python CausalLM:

- `prefill` runs new requests' prompts (left-padded to a common length) through the model
  and picks each row's first token;
- `concatenate` joins a freshly prefilled batch to the running one (the KV cache decides
  how: kv_cache.py, padded or static rows);
- `step` decodes one token for every row; or, on a GPU, `launch` queues a step and returns
  what it chose, to be handed on by `emit_step` while the next step runs (worker.py);
- `filter` drops finished, cancelled and expired rows.

Between forward passes the batch holds, per row, the token chosen last (not yet in the KV
cache) and that token's position; the KV cache holds the attention mask. Every row's
positions count only its own tokens, so a row in a batch computes what it would alone.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from loramux.server.model.base_model import BaseModel
from loramux.server.engine.detokenizer import Detokenizer
from loramux.server.engine.kv_cache import PaddedKv, RowKv, new_dynamic_cache
from loramux.server.engine.request import (
    ErrorEvent,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    PromptEvent,
    Timings,
    TokenEvent,
)
from loramux.server.engine.sampling import BatchParams, choose_tokens, new_generator
from loramux.server.errors import Cancelled, DeadlineExceeded, GrammarFailed, LoramuxError, NonFiniteOutput

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Row:
    request: GenerationRequest
    detokenizer: Detokenizer
    generator: torch.Generator | None
    started: float  # time.monotonic() when the row was admitted
    stop_tokens: frozenset[int]  # the model's EOS ids and the request's stop_token_ids
    generated: int = 0
    generated_ids: list[int] = dataclasses.field(default_factory=list)  # for the penalties' tensors (keeps_history)
    first_token_at: float | None = None
    done: bool = False
    released: bool = False  # its adapter slot has been given back (engine)


def new_row(base: BaseModel, request: GenerationRequest, now: float) -> Row:
    """A row for an admitted request (its max_new_tokens already fits the context: Engine.submit)."""
    return Row(
        request=request,
        detokenizer=Detokenizer(base.tokenizer, request.params.stop, base.decode_text),
        generator=new_generator(request.params),
        started=now,
        stop_tokens=(frozenset() if request.params.ignore_eos else base.eos_token_ids) | request.params.stop_token_ids,
    )


class Batch:
    def __init__(self, base: BaseModel, rows: list[Row], kv: PaddedKv | RowKv, tokens, positions, seen=None, counts=None):
        self.base = base
        self.rows = rows
        self.kv = kv
        self.tokens = tokens  # [n] the token chosen last per row, fed at the next step
        self.positions = positions  # [n, 1] that token's position (= the row's length in the cache)
        self.seen = seen  # [n, V] bool: tokens each row has seen (only while a row has a repetition penalty)
        self.counts = counts  # [n, V] float32: each row's output tokens counted (only while a row has a presence or frequency penalty)
        self.decode = None  # the compiled decode step (compiled_step.py), or None: the model eagerly
        self._route()

    @classmethod
    def empty(cls, base: BaseModel, kv: RowKv, decode=None) -> Batch:
        """A batch of no rows over the static cache, for prefilled batches to join."""
        device = base.device
        batch = cls(base, [], kv, torch.zeros(0, dtype=torch.long, device=device),
                    torch.zeros((0, 1), dtype=torch.long, device=device))
        batch.decode = decode
        return batch

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def kv_length(self) -> int:
        return self.kv.width

    @property
    def adapter_bytes(self) -> int:
        """The adapter weights a pass over this batch reads (each distinct adapter once)."""
        return self._plan.adapter_bytes if self._plan is not None else 0

    def most_remaining(self) -> int:
        """The most tokens one row may still generate (the padded cache grows until it is done)."""
        return max((r.request.params.max_new_tokens - r.generated for r in self.rows), default=0)

    # -- the four operations ------------------------------------------------------------

    @classmethod
    @torch.inference_mode()
    def prefill(cls, base: BaseModel, rows: list[Row], prompt_logprobs: bool = False) -> Batch:
        """Run the rows' prompts (none of them done) and pick their first tokens. Rows of one
        group (the `n` completions of one request) run their prompt once: its keys, values
        and scores are copied to each of them, which then sample on their own.
        `prompt_logprobs`: the rows are one request's (one prompt): every position's scores
        are kept, and its PromptEvent is sent to each row before its first token."""
        leaders, index = _groups(rows)
        if prompt_logprobs and len(leaders) != 1:
            raise ValueError("prompt logprobs are computed for one prompt per prefill")
        device = base.device
        longest = max(len(r.request.prompt_ids) for r in leaders)
        input_ids = torch.full((len(leaders), longest), base.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(leaders), longest), dtype=torch.long, device=device)  # [n, seq]
        for i, row in enumerate(leaders):
            n = len(row.request.prompt_ids)
            input_ids[i, longest - n:] = torch.tensor(row.request.prompt_ids, dtype=torch.long, device=device)
            mask[i, longest - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kv = PaddedKv(new_dynamic_cache(base.model.config), mask)
        batch = cls(base, leaders, kv, None, positions)
        logits = batch._logits(input_ids, every_position=prompt_logprobs)
        if prompt_logprobs:
            event = _prompt_event(logits[0], leaders[0].request.prompt_ids, leaders[0].request.params.prompt_logprobs)
            for row in rows:
                row.request.emit(event)
            logits = logits[:, -1].float().to(device)
        if len(leaders) < len(rows):  # each group's rows get their leader's cache, positions and scores
            batch.kv.select(index, positions)
            at = torch.tensor(index, dtype=torch.long, device=device)
            batch.positions, logits = batch.positions[at], logits[at.to(logits.device)]
            batch.rows = rows
            batch._route()
        batch.seen, batch.counts = _seen_mask(base, rows), _output_counts(base, rows)
        emit_step(batch._pick(logits, batch._start_masks()))
        return batch

    @torch.inference_mode()
    def step(self) -> None:
        """Decode one token for every row (structured-output rows' masks are computed on
        a helper thread while the model runs)."""
        pending = self._start_masks()
        emit_step(self._pick(self._logits(self.tokens[:, None]), pending))

    @torch.inference_mode()
    def launch(self, lag: int) -> StepOutput:
        """Queue one decode step for every row and return what it chose, still on the device
        (copied to the host as the device gets to it): the rows advance on the device, and
        `emit_step` hands the tokens on later, while the next step runs. `lag`: 1 when the
        previous step's tokens are not handed on yet (the rows' counts are one behind).
        Only for batches without structured-output rows (`can_launch`): their next masks
        need this step's tokens on the host first."""
        return self._pick(self._logits(self.tokens[:, None]), None, lag=lag, copy=True)

    def can_launch(self) -> bool:
        return not self._constrained

    @torch.inference_mode()
    def filter(self) -> list[Row]:
        """Drop rows that finished or must end early; returns the rows dropped."""
        for row in self.rows:
            ended_early(row)
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return []
        gone = [row for row in self.rows if row.done]
        order = self.kv.select(keep, self.positions)
        self.rows = [self.rows[i] for i in order]
        if not order:
            return gone
        index = torch.tensor(order, dtype=torch.long, device=self.base.device)
        self.positions, self.tokens = self.positions[index], self.tokens[index]
        self.seen = self.seen[index] if self.seen is not None and _needs_seen(self.rows) else None
        self.counts = self.counts[index] if self.counts is not None and _needs_counts(self.rows) else None
        self._route()
        return gone

    @torch.inference_mode()
    def concatenate(self, other: Batch) -> None:
        """Append `other`'s rows (prefilled separately) to this batch."""
        # Everything new is built before anything is assigned: if an allocation fails, this
        # batch is left as it was and only `other`'s rows are concerned.
        positions = torch.cat([self.positions, other.positions])
        tokens = torch.cat([self.tokens, other.tokens])
        rows = self.rows + other.rows
        seen = None
        if _needs_seen(rows):
            mine_seen = self.seen if self.seen is not None else _seen_mask(self.base, self.rows, force=True)
            their_seen = other.seen if other.seen is not None else _seen_mask(self.base, other.rows, force=True)
            seen = torch.cat([mine_seen, their_seen])
        counts = None
        if _needs_counts(rows):
            mine = self.counts if self.counts is not None else _output_counts(self.base, self.rows, force=True)
            theirs = other.counts if other.counts is not None else _output_counts(self.base, other.rows, force=True)
            counts = torch.cat([mine, theirs])
        plan = self.base.bank.plan([row.request.adapter_uid for row in rows], self.base.device)
        params = _batch_params(rows, self.base.device)
        constrained = [i for i, row in enumerate(rows) if row.request.grammar is not None]
        commit = self.kv.join(other.kv, other.positions)
        commit()
        self.positions, self.tokens, self.rows, self._plan, self._params = positions, tokens, rows, plan, params
        self.seen, self.counts, self._constrained = seen, counts, constrained

    def fail(self, error: LoramuxError) -> list[Row]:
        """End every row with `error` (rows already ended keep their outcome); returns all rows."""
        rows, self.rows = self.rows, []
        try:
            self.kv.select([], self.positions)  # static rows are zeroed for the next batch
        except Exception:  # noqa: BLE001 - the rows are failed either way; rows left unzeroed are logged
            log.exception("zeroing the static KV rows of a failed batch failed; stale values stay behind their masks")
        return Batch.abandon(rows, error)

    @staticmethod
    def abandon(rows: list[Row], error: LoramuxError) -> list[Row]:
        for row in rows:
            if not row.done:
                row.done = True
                row.request.emit(ErrorEvent(error))
        return rows

    # -- internals ----------------------------------------------------------------------

    def _route(self) -> None:
        """Per-composition state: the rows' adapter routing and sampling parameters."""
        self._plan = self.base.bank.plan([row.request.adapter_uid for row in self.rows], self.base.device)
        self._params = _batch_params(self.rows, self.base.device)
        self._constrained = [i for i, row in enumerate(self.rows) if row.request.grammar is not None]

    def _start_masks(self):
        constrained = [i for i in self._constrained if not self.rows[i].done]
        if not constrained:
            return None
        grammars = [self.rows[i].request.grammar for i in constrained]
        return constrained, grammars, grammars[0].grammars.start_masks([g.matcher for g in grammars])

    def _logits(self, input_ids: torch.Tensor, every_position: bool = False) -> torch.Tensor:
        """The model's scores for each row's next token, [n, vocab] float32 (every_position:
        at every position, [n, seq, vocab])."""
        inputs = self.kv.model_inputs(self.positions)
        if self.decode is not None and input_ids.shape[1] == 1:
            logits = self.decode(input_ids, self.positions, inputs, self._plan)
        else:
            self.base.bank.route(self._plan, input_ids.shape[1])
            try:
                out = self.base.model(
                    input_ids=input_ids,
                    position_ids=self.positions,
                    use_cache=True,
                    logits_to_keep=0 if every_position else 1,
                    **inputs,
                )
            finally:
                self.base.bank.route(None)
            logits = out.logits
        if every_position:  # in the model's dtype: the scores are made from it a chunk at a time
            return logits
        return logits[:, -1, :].float().to(self.base.device)  # (from the last layer's device)

    def _pick(self, logits: torch.Tensor, pending, lag: int = 0, copy: bool = False) -> StepOutput:
        """Pick every row's token from `logits` and advance the batch and the cache on the
        device; the returned output is handed on by `emit_step`. `copy`: start copying the
        output to the host now, without waiting for it."""
        rows = self.rows
        generated = None
        if self._params.min_length is not None:  # how far each row is from its min_tokens
            generated = _on_device([row.generated + lag for row in rows], logits.device)
        allowed = None
        if pending is not None:
            constrained, grammars, masks = pending
            mask = grammars[0].grammars.allowed(masks, logits.device)  # [k, V]
            seconds = masks.seconds
            allowed = (torch.tensor(constrained, dtype=torch.long, device=logits.device), mask)
            stuck = (~mask.any(dim=-1)).tolist()
            for j, (i, grammar) in enumerate(zip(constrained, grammars)):
                why = (grammar.late(seconds[j]) if j in masks.late else grammar.failed(seconds[j])) or (
                    "it allows no token here" if stuck[j] else None)
                if why is not None:  # this row alone fails; its token below is not used
                    rows[i].done = True
                    rows[i].request.emit(ErrorEvent(GrammarFailed(
                        f"the request's structured output failed after {rows[i].generated} tokens: {why}",
                        field="structured_output", generated=rows[i].generated)))
        tokens, logprobs, bad, top = choose_tokens(logits, self._params, self.seen, self.counts, generated, allowed)
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens[:, None], torch.ones((len(rows), 1), device=self.counts.device))
        self.tokens = tokens
        self.kv.advance(self.positions)
        self.positions = self.positions[:, -1:] + 1
        chosen = torch.stack([tokens, bad.to(tokens.dtype)])  # [2, n]
        parts = [chosen] + ([logprobs] if logprobs is not None else []) + (list(top) if top is not None else [])
        out = StepOutput(list(rows), parts, logprobs is not None, top is not None)
        if copy:
            out.start_copy()
        return out


@dataclasses.dataclass(eq=False)
class StepOutput:
    """What one step chose, per row of the batch as it was: [tokens; non-finite flags], then
    the logprobs and the top alternatives (logprobs, ids) when some row asked for them."""

    rows: list[Row]
    parts: list[torch.Tensor]
    has_logprobs: bool
    has_top: bool
    _copied: torch.cuda.Event | None = None

    def start_copy(self) -> None:
        """Copy the parts to pinned host memory behind the work that makes them (CUDA: the
        host goes on; `host_lists` waits for the copy alone, not for later steps)."""
        if not self.parts[0].is_cuda:
            return
        self.parts = [part.to("cpu", non_blocking=True) for part in self.parts]  # (pinned by the caching host allocator)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def host_lists(self) -> list[list]:
        if self._copied is not None:
            self._copied.synchronize()
        return [part.tolist() for part in self.parts]  # (not copied ahead: the first waits for the device)


def emit_step(out: StepOutput) -> None:
    """Hand on one step's tokens: each row's event, its stop conditions, its end."""
    lists = out.host_lists()
    (token_list, bad_list), rest = lists[0], lists[1:]
    logprob_list = rest.pop(0) if out.has_logprobs else None
    top_list = list(zip(rest[1], rest[0])) if out.has_top else None  # per row: (ids, logprobs)
    rows = out.rows
    now = time.monotonic()
    for i in (i for i, failed in enumerate(bad_list) if failed):  # this row alone fails; filter() drops it after the pass
        if rows[i].done:
            continue
        rows[i].done = True
        rows[i].request.emit(ErrorEvent(NonFiniteOutput(
            "the model's scores for this request became NaN or infinite (the adapter's weights or the "
            "sampling parameters overflow the serving dtype)",
            generated=rows[i].generated,
        )))
    for i, row in enumerate(rows):
        if not row.done:  # (a row that ended since the step was queued: its token is not used)
            _advance(row, token_list[i], logprob_list[i] if logprob_list else None, now,
                     top_list[i] if top_list else None)


PROMPT_CHUNK = 256  # prompt positions scored at once (their float32 log-probabilities: chunk x vocabulary)


def _on_device(values: list[int], device: torch.device) -> torch.Tensor:
    """values as an int64 tensor on `device`, copied without waiting for the device's queue (a
    copy from pageable host memory to a GPU waits for the stream first; from pinned, it does not)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


def _prompt_event(logits: torch.Tensor, prompt: list[int], top: int) -> PromptEvent:
    """logits [seq, V] over one prompt, in the model's dtype -> each prompt token's logprob
    (from the second on), its rank, and the `top` most likely alternatives at its position;
    PROMPT_CHUNK positions at a time, so that only one chunk is ever held in float32."""
    ids = torch.tensor(prompt[1:], dtype=torch.long, device=logits.device)
    values: list[float] = []
    ranks: list[int] = []
    alternatives: list[list[tuple[int, float]]] = []
    for start in range(0, len(prompt) - 1, PROMPT_CHUNK):
        end = min(start + PROMPT_CHUNK, len(prompt) - 1)
        scores = torch.log_softmax(logits[start:end].float(), dim=-1)  # position i scores token i + 1
        chosen = scores.gather(1, ids[start:end, None])
        values += chosen[:, 0].tolist()
        ranks += ((scores > chosen).sum(dim=-1) + 1).tolist()
        if top:
            best, where = scores.topk(top, dim=-1)
            alternatives += [list(zip(i, v)) for i, v in zip(where.tolist(), best.tolist())]
    return PromptEvent(list(prompt), values, ranks, alternatives)


def _groups(rows: list[Row]) -> tuple[list[Row], list[int]]:
    """The rows whose prompts are run (one per group of `n` completions, and every row not in
    a group), and for each row the index of its group's run."""
    leaders: list[Row] = []
    index: list[int] = []
    seen: dict[int, int] = {}
    for row in rows:
        group = row.request.group
        if group is not None and id(group) in seen:
            index.append(seen[id(group)])
            continue
        if group is not None:
            seen[id(group)] = len(leaders)
        index.append(len(leaders))
        leaders.append(row)
    return leaders, index


def _batch_params(rows: list[Row], device: torch.device) -> BatchParams:
    return BatchParams([r.request.params for r in rows], [r.generator for r in rows], device,
                       [r.stop_tokens for r in rows])


def _needs_counts(rows: list[Row]) -> bool:
    return any(r.request.params.counts_output for r in rows)


def _output_counts(base: BaseModel, rows: list[Row], force: bool = False) -> torch.Tensor | None:
    """[n, V] float32: how often each token is in each row's output, or None when no row needs it."""
    if not force and not _needs_counts(rows):
        return None
    counts = torch.zeros((len(rows), base.vocab_size), dtype=torch.float32, device=base.device)
    for i, row in enumerate(rows):
        if row.generated_ids:
            ids = torch.tensor(row.generated_ids, dtype=torch.long, device=base.device)
            counts[i].scatter_add_(0, ids, torch.ones(len(ids), device=base.device))
    return counts


def _needs_seen(rows: list[Row]) -> bool:
    return any(r.request.params.repetition_penalty != 1.0 for r in rows)


def _seen_mask(base: BaseModel, rows: list[Row], force: bool = False) -> torch.Tensor | None:
    """[n, V] bool of the tokens each row has seen (prompt and output), or None when no row needs it."""
    if not force and not _needs_seen(rows):
        return None
    seen = torch.zeros((len(rows), base.vocab_size), dtype=torch.bool, device=base.device)
    for i, row in enumerate(rows):
        ids = row.request.prompt_ids + row.generated_ids
        seen[i, torch.tensor(ids, dtype=torch.long, device=base.device)] = True
    return seen


def _advance(row: Row, token: int, logprob: float | None, now: float,
             top: tuple[list[int], list[float]] | None = None) -> None:
    request, params = row.request, row.request.params
    row.generated += 1
    if row.first_token_at is None:
        row.first_token_at = now
    request.timeline.generated = row.generated
    if params.keeps_history:
        row.generated_ids.append(token)
    grammar = request.grammar
    complete = accepted = False
    if grammar is not None and token not in row.stop_tokens:
        if not grammar.consume(token):  # the mask allowed it, so only a failing grammar refuses it
            row.done = True
            request.emit(ErrorEvent(GrammarFailed(
                f"the request's structured output refused the token it allowed ({grammar.failed() or 'no reason given'})",
                field="structured_output", generated=row.generated)))
            return
        complete = accepted = grammar.complete()
    elif grammar is not None:  # a stop token: the answer is whole if the constraint could end here
        accepted = grammar.accepting()
    text = row.detokenizer.add(token)
    reason = None
    if row.detokenizer.stopped:
        reason = FinishReason.STOP_SEQUENCE
    elif token in row.stop_tokens or complete:  # a complete structured answer ends as its EOS would
        reason = FinishReason.STOP_TOKEN
    elif row.generated >= params.max_new_tokens:
        reason = FinishReason.LENGTH
    alternatives = [list(zip(top[0][: params.top_logprobs], top[1][: params.top_logprobs]))] if params.top_logprobs else []
    request.emit(TokenEvent([token], [logprob] if params.return_logprobs or params.top_logprobs else [], text, alternatives))
    if reason is not None:
        row.done = True
        request.emit(
            FinishEvent(
                text=row.detokenizer.flush(),
                finish_reason=reason,
                prompt_tokens=len(request.prompt_ids),
                completion_tokens=row.generated,
                grammar_complete=accepted and reason is FinishReason.STOP_TOKEN,
                timings=Timings(
                    queue_wait_s=row.started - request.arrival,
                    time_to_first_token_s=row.first_token_at - request.arrival,
                    total_s=now - request.arrival,
                ),
            )
        )


def ended_early(row: Row) -> bool:
    """End a row whose caller went away or whose deadline passed (reporting it once)."""
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

