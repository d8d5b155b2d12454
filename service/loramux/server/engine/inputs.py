"""Check a generate call's inputs and turn them into prompt ids and sampling parameters."""

from __future__ import annotations

import dataclasses
import math
import struct

from loramux.server.model.base_model import BaseModel
from loramux.server.engine.kv_cache import static_row_tokens
from loramux.server.engine.request import SamplingParams
from loramux.server.engine.constraints import Constraint
from loramux.server.errors import InvalidRequest, NoChatTemplate, PromptTooLong
from loramux.server.settings import Settings

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 256
MAX_MESSAGES = 4096
MAX_ROLE_CHARS = 64
# Outside these, scores overflow float32 (temperature 1e-38 makes every logit infinite).
TEMPERATURE_RANGE = (1e-3, 100.0)
REPETITION_PENALTY_RANGE = (1e-2, 100.0)
PRESENCE_FREQUENCY_RANGE = (-2.0, 2.0)  # OpenAI's
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's
MAX_LOGIT_BIAS = 1024  # tokens a request may bias (OpenAI allows 300)
MAX_TOP_LOGPROBS = 20  # OpenAI's
MAX_COMPLETIONS = 16  # `n`: completions of one prompt in one request (each is a row)
PROMPT_LOGPROBS_BYTES = 1 << 30  # prompt logprobs: the prompt's scores (tokens x vocabulary, in the model's dtype) at most this
# What a chat template is called with by loramux itself: a request's kwargs may not replace them.
RESERVED_TEMPLATE_ARGS = frozenset({"conversation", "messages", "tools", "documents", "add_generation_prompt",
                                    "tokenize", "return_dict", "return_tensors", "chat_template", "continue_final_message",
                                    "padding", "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask"})


def _float32(value: float) -> float:
    """`value` as a float32 field carries it: the documented bounds (0.01) arrive as the
    nearest float32 (0.00999999977...), and must be accepted as what they are."""
    return struct.unpack("f", struct.pack("f", value))[0]


@dataclasses.dataclass
class GenerateInput:
    """A generate call as the domain sees it (the gRPC layer builds it from GenerateRequest)."""

    adapter_id: str = ""
    prompt: str = ""
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)
    messages: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (role, content)
    message_extras: list[dict] = dataclasses.field(default_factory=list)  # per message: its other fields (tool_calls, tool_call_id, name), for the template
    tools: list[dict] = dataclasses.field(default_factory=list)  # tool definitions handed to the chat template
    chat_template_kwargs: dict = dataclasses.field(default_factory=dict)  # more variables for the chat template
    max_new_tokens: int = 0  # 0: the server's default
    temperature: float = 0.0
    top_p: float = 0.0  # 0 or 1: off
    top_k: int = 0
    repetition_penalty: float = 0.0  # 0 or 1: off
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    return_logprobs: bool = False
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0
    top_logprobs: int = 0
    constraint: Constraint | None = None  # structured output: the answer is held to it
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's logprob and its k most likely alternatives


def prompt_ids(inp: GenerateInput, base: BaseModel, settings: Settings, check_length: bool = True,
               chat_template: str | None = None) -> list[int]:
    """The prompt's token ids. Text is bounded in bytes before it is tokenized, so the time a
    request can spend in the tokenizer is bounded too. `check_length`: refuse a prompt longer
    than a request may hold (Tokenize counts it instead). `chat_template`: the adapter's own,
    used for messages instead of the tokenizer's."""
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
    text_bytes = (len(inp.prompt.encode()) + sum(len(c.encode()) + len(r.encode()) for r, c in inp.messages)
                  + _json_bytes(inp.message_extras) + _json_bytes(inp.tools) + _json_bytes(inp.chat_template_kwargs))
    if text_bytes > settings.max_prompt_bytes:
        raise PromptTooLong(
            f"the prompt text is {text_bytes} bytes, more than the {settings.max_prompt_bytes} this server tokenizes",
            field=given[0],
            prompt_bytes=text_bytes,
            max_prompt_bytes=settings.max_prompt_bytes,
        )
    if inp.prompt_token_ids:
        if check_length:
            _check_length(len(inp.prompt_token_ids), "prompt_token_ids", base, settings)
        ids = list(inp.prompt_token_ids)
        bad = [t for t in ids if not 0 <= t < base.vocab_size]
        if bad:
            raise InvalidRequest(
                f"prompt_token_ids has {len(bad)} id(s) outside the vocabulary 0..{base.vocab_size - 1}, e.g. {bad[0]}",
                field="prompt_token_ids",
                reason="TOKEN_ID_OUT_OF_RANGE",
            )
    elif inp.messages:
        if not chat_template and not getattr(tokenizer, "chat_template", None):
            raise NoChatTemplate("the served tokenizer has no chat template; send prompt or prompt_token_ids", field="messages")
        if len(inp.messages) > MAX_MESSAGES:
            raise InvalidRequest(f"messages holds {len(inp.messages)} messages, more than {MAX_MESSAGES}", field="messages", reason="TOO_MANY_MESSAGES")
        for i, (role, _) in enumerate(inp.messages):
            if not role:
                raise InvalidRequest(f"messages[{i}].role is empty", field=f"messages[{i}].role", reason="MESSAGE_ROLE_REQUIRED")
            if len(role) > MAX_ROLE_CHARS:
                raise InvalidRequest(
                    f"messages[{i}].role is longer than {MAX_ROLE_CHARS} characters", field=f"messages[{i}].role", reason="MESSAGE_ROLE_INVALID"
                )
        rendered = render_chat(tokenizer, inp, chat_template)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(inp.prompt)["input_ids"]
    if not ids:
        raise InvalidRequest("the prompt encodes to no tokens", field=given[0], reason="PROMPT_EMPTY")
    if check_length:
        _check_length(len(ids), given[0], base, settings)
    return ids


def _json_bytes(value) -> int:
    if not value:
        return 0
    import json

    try:
        return len(json.dumps(value))
    except (TypeError, ValueError, RecursionError):
        raise InvalidRequest("a chat field is not plain JSON data", field="messages", reason="INVALID_PARAMETER") from None


def render_chat(tokenizer, inp: GenerateInput, chat_template: str | None = None) -> str:
    """The messages through the tokenizer's chat template (or `chat_template`, the adapter's
    own), with the request's tools and template variables. A template that fails on this input is the request's error, naming
    the template (INVALID_ARGUMENT / CHAT_TEMPLATE_FAILED), never INTERNAL."""
    reserved = sorted(RESERVED_TEMPLATE_ARGS & set(inp.chat_template_kwargs))
    if reserved:
        raise InvalidRequest(f"chat_template_kwargs may not set {', '.join(reserved)}", field="chat_template_kwargs",
                             reason="INVALID_PARAMETER")
    chat = []
    for i, (role, content) in enumerate(inp.messages):
        extra = inp.message_extras[i] if i < len(inp.message_extras) else {}
        chat.append({**extra, "role": role, "content": content})
    try:
        return tokenizer.apply_chat_template(chat, tools=inp.tools or None, add_generation_prompt=True, tokenize=False,
                                             chat_template=chat_template, **inp.chat_template_kwargs)
    except RecursionError:
        raise InvalidRequest("the chat template recursed too deeply on these messages", field="messages",
                             reason="CHAT_TEMPLATE_FAILED") from None
    except Exception as e:  # noqa: BLE001 - jinja's errors, and templates' own raise_exception
        message = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        whose = "the adapter's chat template" if chat_template else "the tokenizer's chat template"
        raise InvalidRequest(f"{whose} failed on these messages ({type(e).__name__}: {message})",
                             field="messages", reason="CHAT_TEMPLATE_FAILED") from None


def request_context(base: BaseModel, settings: Settings) -> int:
    """The most tokens one request may hold, prompt and output: the model's context, or a
    static KV cache row's positions when that is less."""
    if settings.kv_cache == "static":
        return static_row_tokens(settings, base.max_sequence_length)
    return base.max_sequence_length


def _check_length(tokens: int, field: str, base: BaseModel, settings: Settings) -> None:
    context = request_context(base, settings)
    if tokens >= context:
        whose = ("the model's context" if context == base.max_sequence_length
                 else "a request's context in this server's static KV cache (kv_cache_tokens)")
        raise PromptTooLong(
            f"the prompt has {tokens} tokens; {whose} is {context} and at least one token must be generated",
            field=field,
            prompt_tokens=tokens,
            max_sequence_length=context,
        )


def sampling_params(inp: GenerateInput, base: BaseModel, settings: Settings) -> SamplingParams:
    def bad(field: str, why: str) -> InvalidRequest:
        return InvalidRequest(f"{field} {why}", field=field, reason="INVALID_SAMPLING_PARAMETER")

    if not 0 <= inp.max_new_tokens <= settings.max_new_tokens_limit:
        raise bad("max_new_tokens", f"must be in 0..{settings.max_new_tokens_limit}, got {inp.max_new_tokens}")
    for name in ("temperature", "top_p", "repetition_penalty"):
        value = getattr(inp, name)
        if not math.isfinite(value) or value < 0:
            raise bad(name, f"must be a finite number >= 0, got {value}")
    for name, (low, high) in (("temperature", TEMPERATURE_RANGE), ("repetition_penalty", REPETITION_PENALTY_RANGE)):
        value = getattr(inp, name)
        if value != 0 and not _float32(low) <= value <= _float32(high):
            raise bad(name, f"must be 0 (off) or in [{low:g}, {high:g}], got {value:g}")
    if inp.top_p > 1:
        raise bad("top_p", f"must be in [0, 1], got {inp.top_p}")
    if inp.top_k < 0:
        raise bad("top_k", f"must be >= 0, got {inp.top_k}")
    if len(inp.stop) > MAX_STOP_SEQUENCES:
        raise bad("stop", f"may hold at most {MAX_STOP_SEQUENCES} sequences, got {len(inp.stop)}")
    for s in inp.stop:
        if not s or len(s) > MAX_STOP_LENGTH:
            raise bad("stop", f"sequences must be 1-{MAX_STOP_LENGTH} characters, got {len(s)}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(inp, name)
        low, high = PRESENCE_FREQUENCY_RANGE
        if not math.isfinite(value) or not low <= value <= high:
            raise bad(name, f"must be in [{low:g}, {high:g}], got {value}")
    if not math.isfinite(inp.min_p) or not 0 <= inp.min_p <= 1:
        raise bad("min_p", f"must be in [0, 1], got {inp.min_p}")
    if len(inp.logit_bias) > MAX_LOGIT_BIAS:
        raise bad("logit_bias", f"may hold at most {MAX_LOGIT_BIAS} tokens, got {len(inp.logit_bias)}")
    for token, value in inp.logit_bias.items():
        if not 0 <= token < base.vocab_size:
            raise bad("logit_bias", f"has token id {token} outside 0..{base.vocab_size - 1}")
        if not math.isfinite(value) or not LOGIT_BIAS_RANGE[0] <= value <= LOGIT_BIAS_RANGE[1]:
            raise bad("logit_bias", f"values must be in [{LOGIT_BIAS_RANGE[0]:g}, {LOGIT_BIAS_RANGE[1]:g}], got {value}")
    if not 0 <= inp.min_tokens <= settings.max_new_tokens_limit:
        raise bad("min_tokens", f"must be in 0..{settings.max_new_tokens_limit}, got {inp.min_tokens}")
    if not 0 <= inp.top_logprobs <= MAX_TOP_LOGPROBS:
        raise bad("top_logprobs", f"must be in 0..{MAX_TOP_LOGPROBS}, got {inp.top_logprobs}")
    if inp.prompt_logprobs is not None and not 0 <= inp.prompt_logprobs <= MAX_TOP_LOGPROBS:
        raise bad("prompt_logprobs", f"must be in 0..{MAX_TOP_LOGPROBS}, got {inp.prompt_logprobs}")
    if len(inp.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise bad("stop_token_ids", f"may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(inp.stop_token_ids)}")
    out_of_range = [t for t in inp.stop_token_ids if not 0 <= t < base.vocab_size]
    if out_of_range:
        raise bad("stop_token_ids", f"has ids outside 0..{base.vocab_size - 1}, e.g. {out_of_range[0]}")
    return SamplingParams(
        max_new_tokens=inp.max_new_tokens or settings.default_max_new_tokens,
        temperature=inp.temperature,
        top_p=inp.top_p if 0 < inp.top_p < 1 else 1.0,
        top_k=inp.top_k if inp.top_k < base.vocab_size else 0,  # as many as the vocabulary, or more: every token
        repetition_penalty=inp.repetition_penalty if inp.repetition_penalty > 0 else 1.0,
        seed=inp.seed,
        stop=tuple(inp.stop),
        stop_token_ids=frozenset(inp.stop_token_ids),
        return_logprobs=inp.return_logprobs,
        ignore_eos=inp.ignore_eos,
        presence_penalty=inp.presence_penalty,
        frequency_penalty=inp.frequency_penalty,
        min_p=inp.min_p,
        logit_bias=tuple(sorted(inp.logit_bias.items())),
        min_tokens=inp.min_tokens,
        top_logprobs=inp.top_logprobs,
        prompt_logprobs=inp.prompt_logprobs,
    )
