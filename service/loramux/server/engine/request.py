"""What a generation request is, and the events the engine sends back for it."""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable

from loramux.server.adapters.cache import Tier
from loramux.server.errors import LoramuxError


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP_TOKEN = "stop_token"
    STOP_SEQUENCE = "stop_sequence"

    @property
    def openai(self) -> str:
        """The standard value (OpenAI's API, the GenAI conventions): stop or length."""
        return "length" if self is FinishReason.LENGTH else "stop"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    return_logprobs: bool = False
    ignore_eos: bool = False  # EOS does not end the row (max_new_tokens or a stop does)
    presence_penalty: float = 0.0  # subtracted from a token's logit once it is in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    min_p: float = 0.0  # sampled rows: drop tokens below min_p x the top token's probability
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the row before this many tokens
    top_logprobs: int = 0  # the most likely alternatives returned per token (with their logprobs)
    prompt_logprobs: int | None = None  # None: off; k >= 0: each prompt token's logprob (and its k most likely alternatives)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def counts_output(self) -> bool:
        """Whether the row's output token counts are needed (presence or frequency penalty)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def keeps_history(self) -> bool:
        """Whether the row's generated ids are kept (for the penalties' tensors)."""
        return self.repetition_penalty != 1.0 or self.counts_output


@dataclasses.dataclass(frozen=True)
class Timings:
    queue_wait_s: float
    time_to_first_token_s: float
    total_s: float


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """Tokens decoded in one step, and the text they made safe to show."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)  # per token: (id, logprob), most likely first


@dataclasses.dataclass(frozen=True)
class PromptEvent:
    """The prompt's tokens as the model scored them (with prompt_logprobs), sent before the
    first TokenEvent. The first token has no score (nothing precedes it): the lists below
    start at the second, each with the rank of the token among the vocabulary (1: the most
    likely)."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class FinishEvent:
    text: str  # text not yet sent in a TokenEvent
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    # A structured-output answer its constraint accepts whole: ended by the constraint, or by
    # a stop token where the constraint could end (not cut by length or a stop string).
    grammar_complete: bool = False


@dataclasses.dataclass(frozen=True)
class ErrorEvent:
    error: LoramuxError


Event = PromptEvent | TokenEvent | FinishEvent | ErrorEvent


@dataclasses.dataclass
class Timeline:
    """When a request passed each stage (wall clock, ns), for its trace spans."""

    arrival_ns: int = dataclasses.field(default_factory=time.time_ns)
    tier_found: Tier | None = None  # where its adapter was when it arrived
    load_s: float | None = None  # time spent bringing the adapter into a slot (disk read, promotion)
    admitted_ns: int = 0
    prefill_start_ns: int = 0
    prefill_end_ns: int = 0
    prefill_rows: int = 0  # rows prefilled together with it
    generated: int = 0


@dataclasses.dataclass(eq=False)
class GenerationRequest:
    tenant: str
    adapter_uid: int | None  # None: the base model alone
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]  # called on the engine thread; must not block
    deadline: float | None = None  # time.monotonic() by which it must finish
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False  # set from any thread; the engine drops the row at its next step
    adapter_id: str = ""
    trace_context: object = None  # the caller's OpenTelemetry context (spans are its children)
    arrival_step: int = 0  # the engine's decode step count when it was queued
    timeline: Timeline = dataclasses.field(default_factory=Timeline)
    grammar: object = None  # structured output: its structured.RowGrammar (compiled before it was queued)
    group: object = None  # the `n` completions of one request share this (and their prompt's prefill)
    model: str = ""  # the model the caller named: an adapter's id, or the base model's public name (metrics)
    operation: str = "text_completion"  # or "chat" (GenAI conventions' gen_ai.operation.name)
    counts_prompt: bool = True  # its prompt tokens are counted in metrics (once per group of n)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

