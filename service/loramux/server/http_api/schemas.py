"""OpenAI request bodies, checked and turned into the engine's GenerateInput.

Parameters follow OpenAI's meanings and defaults (temperature 1 and top_p 1 when absent, so
sampling unless asked otherwise; 16 tokens for a completion without `max_tokens`), with
vLLM's extensions `top_k`, `min_p`, `min_tokens`, `repetition_penalty`, `ignore_eos` and
`stop_token_ids`. A
parameter loramux does not implement yet is refused with a 400 naming it when it asks for
anything but its default (so no caller gets an answer that silently ignored what it asked
for); unknown fields are ignored, as clients and routers add their own.
"""

from __future__ import annotations

import json
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from loramux.server.engine.facade import (
    MAX_COMPLETIONS, MAX_LOGIT_BIAS, MAX_MESSAGES, MAX_STOP_SEQUENCES, MAX_STOP_TOKEN_IDS, Constraint, GenerateInput,
)
from loramux.server.errors import InvalidRequest

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's, for /v1/completions
MAX_PROMPT_IDS = 1 << 20
MAX_TOOLS = 256  # tool definitions in one request

# Parameters of OpenAI's API not implemented yet, and the value that means "not used".
NOT_YET = {
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),  # echo: completions only
    "functions": (None, []), "function_call": (None, "none"),
    "guided_decoding_backend": (None,),
    "parallel_tool_calls": (None, True, False),
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str | None = Field(default=None, max_length=256)
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs object (its newer name for the guided_* fields): one of them."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | bool | str | None = Field(default=None, alias="json")
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = Field(default=None, max_length=1024)
    json_object: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (free), json_object, or json_schema."""

    type: str
    json_schema: JsonSchemaFormat | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    # The request field a structured-output error is about (the engine knows only "structured_output").
    _constraint_param: str = pydantic.PrivateAttr(default="response_format")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 64)
    # Lists are bounded where they are parsed, so that a body of a million entries is refused
    # before it costs the server more than reading it.
    stop: str | list[str] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_p: float | None = None
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    min_tokens: int | None = Field(default=None, ge=0)
    n: int | None = Field(default=None, ge=1, le=MAX_COMPLETIONS)  # completions of the prompt, sharing its prefill
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM's: the prompt's tokens scored
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Structured output: OpenAI's response_format, or vLLM's guided_* (at most one of them).
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = Field(default=None, max_length=1024)
    structured_outputs: StructuredOutputs | None = None

    def _constraint(self) -> Constraint | None:
        vllm = self.structured_outputs or StructuredOutputs()
        asked = {name: value for name, value in (
            ("structured_outputs.json", vllm.json_), ("structured_outputs.regex", vllm.regex),
            ("structured_outputs.grammar", vllm.grammar), ("structured_outputs.choice", vllm.choice),
            ("structured_outputs.json_object", True if vllm.json_object else None),
            ("response_format", self.response_format if self.response_format and self.response_format.type != "text" else None),
            ("guided_json", self.guided_json), ("guided_regex", self.guided_regex),
            ("guided_grammar", self.guided_grammar), ("guided_choice", self.guided_choice)) if value is not None}
        if len(asked) > 1:
            raise InvalidRequest(f"at most one of {', '.join(asked)} may be set", field=list(asked)[1],
                                 reason="INVALID_PARAMETER")
        if not asked:
            return None
        name, value = next(iter(asked.items()))
        self._constraint_param = name.split(".")[0] if name.startswith("structured_outputs") else name
        name = {"structured_outputs.json": "guided_json", "structured_outputs.regex": "guided_regex",
                "structured_outputs.grammar": "guided_grammar", "structured_outputs.choice": "guided_choice"}.get(name, name)
        if name == "structured_outputs.json_object":
            return Constraint("json_object")
        if name == "response_format":
            if value.type == "json_object":
                return Constraint("json_object")
            if value.type != "json_schema":
                raise InvalidRequest(f"response_format.type must be text, json_object or json_schema, got {value.type[:40]!r}",
                                     field="response_format", reason="INVALID_PARAMETER")
            if value.json_schema is None or value.json_schema.schema_ is None:
                raise InvalidRequest("response_format json_schema needs json_schema.schema", field="response_format",
                                     reason="INVALID_PARAMETER")
            return Constraint("json_schema", _dumps(value.json_schema.schema_))
        if name == "guided_json":
            return Constraint("json_schema", value if isinstance(value, str) else _dumps(value))
        kind = {"guided_regex": "regex", "guided_grammar": "grammar"}.get(name)
        return Constraint(kind, value) if kind else Constraint("choice", _dumps(value))

    def _sampling(self, default_max_tokens: int) -> dict[str, Any]:
        for name, unused in NOT_YET.items():
            value = (self.model_extra or {}).get(name)
            if value is not None and value not in unused:
                raise InvalidRequest(f"{name} is not supported by this server yet", field=name, reason="UNSUPPORTED_PARAMETER")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.removeprefix("-").isdecimal()) or len(key) > 12:  # one sign at most
                raise InvalidRequest(f"logit_bias keys must be token ids, got {key[:40]!r}", field="logit_bias",
                                     reason="INVALID_PARAMETER")
            bias[int(key)] = value
        return dict(
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            min_p=self.min_p or 0.0,
            logit_bias=bias,
            min_tokens=self.min_tokens or 0,
            max_new_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,  # -1: vLLM's "off"
            repetition_penalty=self.repetition_penalty or 0.0,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            constraint=self._constraint(),
            prompt_logprobs=self.prompt_logprobs,
        )


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False  # the prompt before the answer (with logprobs: the prompt's tokens scored too)

    def to_input(self, adapter_id: str) -> GenerateInput:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise InvalidRequest("one prompt per request is supported (send each prompt as its own request)",
                                     field="prompt", reason="UNSUPPORTED_PARAMETER")
            prompt = prompt[0]
        text, ids = (prompt, []) if isinstance(prompt, str) else ("", list(prompt))
        if len(ids) > MAX_PROMPT_IDS:
            raise InvalidRequest(f"prompt holds more than {MAX_PROMPT_IDS} token ids", field="prompt", reason="PROMPT_TOO_LONG")
        if not text and not ids:
            raise InvalidRequest("prompt is empty", field="prompt", reason="PROMPT_REQUIRED")
        sampling = self._sampling(COMPLETION_DEFAULT_MAX_TOKENS)
        if self.echo and self.logprobs is not None:  # the echoed prompt's tokens come with theirs
            sampling["prompt_logprobs"] = max(sampling["prompt_logprobs"] or 0, self.logprobs)
        return GenerateInput(adapter_id=adapter_id, prompt=text, prompt_token_ids=ids,
                             return_logprobs=self.logprobs is not None, top_logprobs=self.logprobs or 0, **sampling)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(max_length=64)
    content: str | list[dict[str, Any]] | None = None

    def extras(self) -> dict[str, Any]:
        """Its other fields (tool_calls, tool_call_id, name, ...), handed to the chat template."""
        return dict(self.model_extra or {})

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:  # content parts: text only
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"messages[{index}].content: only text parts are supported",
                                     field=f"messages[{index}].content", reason="UNSUPPORTED_PARAMETER")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def to_input(self, adapter_id: str, default_max_tokens: int) -> GenerateInput:
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", field="top_logprobs", reason="INVALID_PARAMETER")
        sampling = self._sampling(default_max_tokens)
        if self.max_completion_tokens is not None:
            sampling["max_new_tokens"] = self.max_completion_tokens
        forced = self.forced_tool()
        if forced is not None:  # the answer is held to the call's JSON (structured output)
            if sampling["constraint"] is not None:
                raise InvalidRequest("a forced tool_choice cannot be combined with another structured output",
                                     field="tool_choice", reason="INVALID_PARAMETER")
            sampling["constraint"] = Constraint("json_schema", _dumps(self._call_schema(forced)))
            self._constraint_param = "tools"
        messages = [(m.role, m.text(i)) for i, m in enumerate(self.messages)]
        return GenerateInput(adapter_id=adapter_id, messages=messages, message_extras=[m.extras() for m in self.messages],
                             tools=list(self.tools or []) if self.tool_choice != "none" else [],
                             chat_template_kwargs=dict(self.chat_template_kwargs or {}), return_logprobs=self.logprobs,
                             top_logprobs=self.top_logprobs or 0, **sampling)

    def forced_tool(self) -> str | None:
        """With `tool_choice` "required": "" (any of the tools, one call or more); naming a
        function: its name; else (auto, none, absent) None: the model answers freely."""
        choice = self.tool_choice
        if choice in (None, "auto", "none"):
            return None
        if not self.tools:
            raise InvalidRequest("tool_choice forces a tool call, but tools is empty", field="tool_choice",
                                 reason="INVALID_PARAMETER")
        if choice == "required":
            return ""
        function = choice.get("function") if isinstance(choice, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidRequest('tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                                 '{"name": ...}}', field="tool_choice", reason="INVALID_PARAMETER")
        if name not in self._tool_parameters():
            raise InvalidRequest(f"tool_choice names {name[:64]!r}, which is not in tools", field="tool_choice",
                                 reason="INVALID_PARAMETER")
        return name

    def _tool_parameters(self) -> dict[str, Any]:
        """Each function tool's name and its parameters' schema (any object when it gives none)."""
        found = {}
        for i, tool in enumerate(self.tools or []):
            function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise InvalidRequest(f"tools[{i}] is not a function tool with a name", field=f"tools[{i}]",
                                     reason="INVALID_PARAMETER")
            parameters = function.get("parameters")
            found[function["name"]] = parameters if isinstance(parameters, (dict, bool)) else {"type": "object"}
        return found

    def _call_schema(self, forced: str) -> Any:
        """The JSON the model writes for a forced call: the named function's arguments, or
        (required) a list of calls `[{"name", "parameters"}]`, as vLLM does."""
        parameters = self._tool_parameters()
        if forced:
            return parameters[forced]
        # Each tool's schema is nested in the combined one: its definitions move to the root,
        # where its "#/$defs/..." references resolve, and its other "#..." references are
        # rebased onto where it now lies.
        definitions: dict[str, dict] = {"$defs": {}, "definitions": {}}
        calls = []
        for i, (name, schema) in enumerate(parameters.items()):
            if isinstance(schema, dict):
                schema = dict(schema)
                for key in ("$defs", "definitions"):
                    found = schema.pop(key, None) or {}
                    if not isinstance(found, dict):
                        raise InvalidRequest(f"tools: {name[:64]}'s {key} must be an object of schemas", field="tools",
                                             reason="INVALID_PARAMETER")
                    for def_name, definition in found.items():
                        if definitions[key].setdefault(def_name, definition) != definition:
                            raise InvalidRequest(f"tools define {key}/{def_name[:64]} differently; a required tool call "
                                                 "needs one meaning per name", field="tools", reason="INVALID_PARAMETER")
                schema = _rebased(schema, f"#/items/anyOf/{i}/properties/parameters")
            calls.append({"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
                          "required": ["name", "parameters"], "additionalProperties": False})
        combined = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        combined.update({key: value for key, value in definitions.items() if value})
        return combined


def _rebased(schema, prefix: str, depth: int = 0):
    """`schema` with its "#..." references (but those into hoisted definitions) pointing under
    `prefix`, where it now lies inside a larger schema."""
    if depth > 64:
        raise InvalidRequest("a tool's parameters nest too deeply", field="tools", reason="INVALID_PARAMETER")
    if isinstance(schema, list):
        return [_rebased(item, prefix, depth + 1) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#") \
                and not value.startswith(("#/$defs/", "#/definitions/")):
            out[key] = prefix + value[1:]
        else:
            out[key] = _rebased(value, prefix, depth + 1)
    return out


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered as /v1/chat/completions renders them."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(default=None, max_length=256)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, max_length=MAX_MESSAGES)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    chat_template_kwargs: dict[str, Any] | None = None

    def to_input(self, adapter_id: str = "") -> GenerateInput:
        """`adapter_id`: whose chat template renders the messages (its own, when it ships one)."""
        messages = self.messages or []
        return GenerateInput(adapter_id=adapter_id, prompt=self.prompt or "", messages=[(m.role, m.text(i)) for i, m in enumerate(messages)],
                             message_extras=[m.extras() for m in messages], tools=list(self.tools or []),
                             chat_template_kwargs=dict(self.chat_template_kwargs or {}))


def _dumps(value) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        raise InvalidRequest("the structured output's schema nests too deeply", field="response_format",
                             reason="INVALID_GRAMMAR") from None


def parse(model: type[BaseModel], body: bytes) -> Any:
    """The body as `model`, or InvalidRequest naming the first field at fault."""
    try:
        return model.model_validate_json(body)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        where = _field_path(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            raise InvalidRequest(f"the request body is not valid JSON ({first.get('msg', '')})",
                                 reason="MALFORMED_REQUEST") from None
        raise InvalidRequest(f"{where or 'body'}: {first.get('msg', 'invalid')}", field=where or None,
                             reason="INVALID_PARAMETER") from None


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "bytes"})


def _field_path(loc: tuple) -> str:
    """A validation error's location as the engine names fields (`messages[0].role`), without
    the union member pydantic tried (`str`, `list[int]`): the field, never the validator's types."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" not in str(part) and str(part) not in _UNION_TAGS:
            path += ("." if path else "") + str(part)
    return path


def constraint_param(body) -> str:
    """The request field a structured-output error names (response_format, guided_regex, ...)."""
    return getattr(body, "_constraint_param", "response_format")
