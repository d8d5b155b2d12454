"""Check a generate call's inputs and turn them into prompt ids and sampling parameters."""

from __future__ import annotations

import dataclasses
import math

from loramux.server.base_model import BaseModel
from loramux.server.engine.request import SamplingParams
from loramux.server.errors import InvalidRequest, NoChatTemplate, PromptTooLong
from loramux.server.settings import Settings

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256


@dataclasses.dataclass
class GenerateInput:
    """A generate call as the domain sees it (the gRPC layer builds it from GenerateRequest)."""

    adapter_id: str = ""
    prompt: str = ""
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)
    messages: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (role, content)
    max_new_tokens: int = 0  # 0: the server's default
    temperature: float = 0.0
    top_p: float = 0.0  # 0 or 1: off
    top_k: int = 0
    repetition_penalty: float = 0.0  # 0 or 1: off
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    return_logprobs: bool = False


def prompt_ids(inp: GenerateInput, base: BaseModel) -> list[int]:
    given = [name for name, present in (
        ("prompt", bool(inp.prompt)),
        ("prompt_token_ids", bool(inp.prompt_token_ids)),
        ("messages", bool(inp.messages)),
    ) if present]
    if len(given) != 1:
        raise InvalidRequest(
            "exactly one of prompt, prompt_token_ids and messages must be set"
            + (f" (got {', '.join(given)})" if given else ""),
            field=given[1] if len(given) > 1 else "prompt",
            reason="PROMPT_REQUIRED" if not given else "PROMPT_AMBIGUOUS",
        )
    tokenizer = base.tokenizer
    if inp.prompt_token_ids:
        ids = list(inp.prompt_token_ids)
        bad = [t for t in ids if not 0 <= t < base.vocab_size]
        if bad:
            raise InvalidRequest(
                f"prompt_token_ids has {len(bad)} id(s) outside the vocabulary 0..{base.vocab_size - 1}, e.g. {bad[0]}",
                field="prompt_token_ids",
                reason="TOKEN_ID_OUT_OF_RANGE",
            )
    elif inp.messages:
        if not getattr(tokenizer, "chat_template", None):
            raise NoChatTemplate("the served tokenizer has no chat template; send prompt or prompt_token_ids", field="messages")
        for i, (role, _) in enumerate(inp.messages):
            if not role:
                raise InvalidRequest(f"messages[{i}].role is empty", field=f"messages[{i}].role", reason="MESSAGE_ROLE_REQUIRED")
        chat = [{"role": role, "content": content} for role, content in inp.messages]
        rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(inp.prompt)["input_ids"]
    if not ids:
        raise InvalidRequest("the prompt encodes to no tokens", field=given[0], reason="PROMPT_EMPTY")
    if len(ids) >= base.max_sequence_length:
        raise PromptTooLong(
            f"the prompt has {len(ids)} tokens; the model's context is {base.max_sequence_length} "
            "and at least one token must be generated",
            field=given[0],
            prompt_tokens=len(ids),
            max_sequence_length=base.max_sequence_length,
        )
    return ids


def sampling_params(inp: GenerateInput, base: BaseModel, settings: Settings) -> SamplingParams:
    def bad(field: str, why: str) -> InvalidRequest:
        return InvalidRequest(f"{field} {why}", field=field, reason="INVALID_SAMPLING_PARAMETER")

    if not 0 <= inp.max_new_tokens <= settings.max_new_tokens_limit:
        raise bad("max_new_tokens", f"must be in 0..{settings.max_new_tokens_limit}, got {inp.max_new_tokens}")
    for name in ("temperature", "top_p", "repetition_penalty"):
        value = getattr(inp, name)
        if not math.isfinite(value) or value < 0:
            raise bad(name, f"must be a finite number >= 0, got {value}")
    if inp.top_p > 1:
        raise bad("top_p", f"must be in [0, 1], got {inp.top_p}")
    if inp.top_k < 0:
        raise bad("top_k", f"must be >= 0, got {inp.top_k}")
    if len(inp.stop) > MAX_STOP_SEQUENCES:
        raise bad("stop", f"may hold at most {MAX_STOP_SEQUENCES} sequences, got {len(inp.stop)}")
    for s in inp.stop:
        if not s or len(s) > MAX_STOP_LENGTH:
            raise bad("stop", f"sequences must be 1-{MAX_STOP_LENGTH} characters, got {len(s)}")
    out_of_range = [t for t in inp.stop_token_ids if not 0 <= t < base.vocab_size]
    if out_of_range:
        raise bad("stop_token_ids", f"has ids outside 0..{base.vocab_size - 1}, e.g. {out_of_range[0]}")
    return SamplingParams(
        max_new_tokens=inp.max_new_tokens or settings.default_max_new_tokens,
        temperature=inp.temperature,
        top_p=inp.top_p if 0 < inp.top_p < 1 else 1.0,
        top_k=inp.top_k,
        repetition_penalty=inp.repetition_penalty if inp.repetition_penalty > 0 else 1.0,
        seed=inp.seed,
        stop=tuple(inp.stop),
        stop_token_ids=frozenset(inp.stop_token_ids),
        return_logprobs=inp.return_logprobs,
    )
