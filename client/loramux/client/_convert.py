"""Request building and response conversion shared by Client and AsyncClient."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

import grpc
from google.longrunning import operations_pb2

from loramux.client import types
from loramux.client.errors import InternalError, from_status
from loramux.v1 import adapter_pb2, generation_pb2, loramux_service_pb2

_FINISH = {
    generation_pb2.FINISH_REASON_LENGTH: "length",
    generation_pb2.FINISH_REASON_STOP_TOKEN: "stop_token",
    generation_pb2.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
}
_TIER = {adapter_pb2.TIER_ACCELERATOR: "accelerator", adapter_pb2.TIER_HOST: "host", adapter_pb2.TIER_DISK: "disk"}
_PHASE = {
    loramux_service_pb2.MergeMetadata.PHASE_QUEUED: "queued",
    loramux_service_pb2.MergeMetadata.PHASE_MERGING: "merging",
    loramux_service_pb2.MergeMetadata.PHASE_WRITING_CONFIG: "writing_config",
    loramux_service_pb2.MergeMetadata.PHASE_DONE: "done",
    loramux_service_pb2.MergeMetadata.PHASE_VERIFYING: "verifying",
    loramux_service_pb2.MergeMetadata.PHASE_REGISTERING: "registering",
}

Message = Mapping[str, str] | tuple[str, str]


def generate_request(
    adapter_id: str = "",
    prompt: str | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    messages: Iterable[Message] | None = None,
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    repetition_penalty: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    return_logprobs: bool = False,
    ignore_eos: bool = False,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    min_p: float = 0.0,
    logit_bias: Mapping[int, float] | None = None,
    min_tokens: int = 0,
    top_logprobs: int = 0,
    tools: Sequence[Mapping] | None = None,
    chat_template_kwargs: Mapping | None = None,
    json_object: bool = False,
    json_schema: Mapping | str | None = None,
    regex: str | None = None,
    grammar: str | None = None,
    choice: Sequence[str] | None = None,
    n: int = 0,
    prompt_logprobs: int | None = None,
) -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest(
        n=n,
        adapter_id=adapter_id,
        prompt=prompt or "",
        prompt_token_ids=list(prompt_token_ids or ()),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        return_logprobs=return_logprobs,
        ignore_eos=ignore_eos,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        min_p=min_p,
        logit_bias=dict(logit_bias or {}),
        min_tokens=min_tokens,
        top_logprobs=top_logprobs,
        tools_json=json.dumps(list(tools)) if tools else "",
        chat_template_kwargs_json=json.dumps(dict(chat_template_kwargs)) if chat_template_kwargs else "",
    )
    for m in messages or ():
        if isinstance(m, Mapping):  # OpenAI-style: role, content and any other fields (tool_calls, ...)
            extra = {k: v for k, v in m.items() if k not in ("role", "content")}
            request.messages.add(role=m["role"], content=m.get("content") or "",
                                 extra_json=json.dumps(extra) if extra else "")
        else:
            role, content = m
            request.messages.add(role=role, content=content)
    if seed is not None:
        request.seed = seed
    if prompt_logprobs is not None:
        request.prompt_logprobs = prompt_logprobs
    structured = {name: value for name, value in (("json_object", json_object or None), ("json_schema", json_schema),
                                                  ("regex", regex), ("grammar", grammar), ("choice", choice))
                  if value is not None}
    if len(structured) > 1:
        raise ValueError(f"at most one of json_object, json_schema, regex, grammar and choice, got {', '.join(structured)}")
    for name, value in structured.items():
        so = request.structured_output
        if name == "choice":
            so.choice.choices.extend(value)
        elif name == "json_schema":
            so.json_schema = value if isinstance(value, str) else json.dumps(dict(value))
        else:
            setattr(so, name, value)
    return request


def tokenize_request(
    prompt: str | None = None,
    messages: Iterable[Message] | None = None,
    tools: Sequence[Mapping] | None = None,
    chat_template_kwargs: Mapping | None = None,
    adapter_id: str = "",
) -> generation_pb2.TokenizeRequest:
    full = generate_request(prompt=prompt, messages=messages, tools=tools, chat_template_kwargs=chat_template_kwargs)
    return generation_pb2.TokenizeRequest(prompt=full.prompt, messages=full.messages, tools_json=full.tools_json,
                                          chat_template_kwargs_json=full.chat_template_kwargs_json, adapter_id=adapter_id)


def _timings(t: generation_pb2.Timings) -> types.Timings:
    return types.Timings(
        queue_wait_s=t.queue_wait.ToNanoseconds() / 1e9,
        time_to_first_token_s=t.time_to_first_token.ToNanoseconds() / 1e9,
        total_s=t.total.ToNanoseconds() / 1e9,
    )


def generate_result(r: generation_pb2.GenerateResponse) -> types.GenerateResult:
    return types.GenerateResult(
        text=r.text,
        token_ids=list(r.token_ids),
        logprobs=list(r.logprobs),
        finish_reason=_FINISH.get(r.finish_reason, "unspecified"),
        usage=types.Usage(r.usage.prompt_tokens, r.usage.completion_tokens),
        timings=_timings(r.timings),
        top_logprobs=_alternatives(r.top_logprobs),
        completions=[types.Completion(index=c.index, text=c.text, token_ids=list(c.token_ids), logprobs=list(c.logprobs),
                                      finish_reason=_FINISH.get(c.finish_reason, "unspecified"),
                                      usage=types.Usage(c.usage.prompt_tokens, c.usage.completion_tokens),
                                      top_logprobs=_alternatives(c.top_logprobs)) for c in r.completions],
        prompt=_prompt(r),
    )


def _prompt(r) -> types.PromptScores | None:
    if not r.prompt_token_ids:
        return None
    return types.PromptScores(token_ids=list(r.prompt_token_ids), logprobs=list(r.prompt_logprobs),
                              ranks=list(r.prompt_ranks), top_logprobs=_alternatives(r.prompt_top_logprobs))


def _alternatives(entries) -> list[list[tuple[int, float]]]:
    return [list(zip(e.token_ids, e.logprobs)) for e in entries]


def stream_chunk(c: generation_pb2.GenerateStreamResponse) -> types.StreamChunk:
    last = c.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
    return types.StreamChunk(
        text=c.text,
        token_ids=list(c.token_ids),
        logprobs=list(c.logprobs),
        finish_reason=_FINISH.get(c.finish_reason) if last else None,
        usage=types.Usage(c.usage.prompt_tokens, c.usage.completion_tokens) if last else None,
        timings=_timings(c.timings) if last else None,
        top_logprobs=_alternatives(c.top_logprobs),
        index=c.index,
        prompt=_prompt(c),
    )


def adapter_info(a: adapter_pb2.Adapter) -> types.AdapterInfo:
    return types.AdapterInfo(
        adapter_id=a.adapter_id,
        source=a.source,
        revision=a.revision,
        rank=a.rank,
        alpha=a.alpha,
        target_modules=list(a.target_modules),
        size_bytes=a.size_bytes,
        tier=_TIER.get(a.tier, "unspecified"),
        pinned=a.pinned,
        last_used=a.last_used_time.ToDatetime() if a.HasField("last_used_time") else None,
        use_count=a.use_count,
        use_rslora=a.use_rslora,
        base_model=a.base_model,
        load_time=a.load_time.ToDatetime() if a.HasField("load_time") else None,
    )


def combine_request(adapters, output_dir: str, *, method: str, svd_rank: int, svd_clamp: float, density: float,
                    majority_sign_method: str, seed: int, **merge) -> loramux_service_pb2.MergeRequest:
    """A Merge request for a weighted combination ((adapter_id, weight), ...)."""
    combination = loramux_service_pb2.Combination(
        method=method, adapters=[loramux_service_pb2.WeightedAdapter(adapter_id=a, weight=w) for a, w in adapters],
        svd_rank=svd_rank, svd_clamp=svd_clamp, density=density, majority_sign_method=majority_sign_method, seed=seed,
    )
    return loramux_service_pb2.MergeRequest(output_dir=output_dir, combination=combination, **merge)


def merge_progress(op: operations_pb2.Operation) -> types.MergeProgress:
    meta = loramux_service_pb2.MergeMetadata()
    op.metadata.Unpack(meta)
    return types.MergeProgress(
        operation=op.name,
        phase=_PHASE.get(meta.phase, "unspecified"),
        tensors_done=meta.tensors_done,
        tensors_total=meta.tensors_total,
        percent=meta.progress_percent,
        done=op.done,
        bytes_done=meta.bytes_done,
        bytes_total=meta.bytes_total,
        error=_operation_error(op),
    )


def _operation_error(op: operations_pb2.Operation) -> str:
    if not op.HasField("error"):
        return ""
    code = next((c for c in grpc.StatusCode if c.value[0] == op.error.code), grpc.StatusCode.UNKNOWN)
    return f"{code.name}: {op.error.message}"


def merge_result(op: operations_pb2.Operation) -> types.MergeResult:
    """The result of a finished merge operation; raises its error if it failed."""
    if op.HasField("error"):
        code = next((c for c in grpc.StatusCode if c.value[0] == op.error.code), grpc.StatusCode.UNKNOWN)
        raise from_status(code, op.error, op.error.message)
    response = loramux_service_pb2.MergeResponse()
    op.response.Unpack(response)
    return types.MergeResult(
        output_path=response.output_path, files=list(response.files), size_bytes=response.size_bytes,
        merged_tensors=response.merged_tensors, manifest_sha256=response.manifest_sha256,
        max_logit_difference=response.max_logit_difference if response.verified else None,
    )


def server_info(i: loramux_service_pb2.ServerInfo) -> types.ServerInfo:
    return types.ServerInfo(
        model_id=i.model_id,
        model_revision=i.model_revision,
        dtype=i.dtype,
        device=i.device,
        adapter_slots=i.adapter_slots,
        host_cache_bytes=i.host_cache_bytes,
        max_lora_rank=i.max_lora_rank,
        max_batch_size=i.max_batch_size,
        max_sequence_length=i.max_sequence_length,
        target_modules=list(i.target_modules),
        versions=dict(i.versions),
        adapter_memory_bytes=i.adapter_memory_bytes,
        quantization=i.quantization or "none",
        model_bytes=i.model_bytes,
        kv_cache=i.kv_cache or "dynamic",
        kv_cache_tokens=i.kv_cache_tokens,
        kv_cache_bytes=i.kv_cache_bytes,
        compiled=i.compiled,
        compiled_graphs=i.compiled_graphs,
        lora_dtype=i.lora_dtype,
        lora_kernel=i.lora_kernel or "torch",
        cuda_graphs=i.cuda_graphs,
        cuda_graphs_captured=i.cuda_graphs_captured,
        engine_process=i.engine_process,
    )


def channel_credentials(
    tls: bool, root_certificates: bytes | None, private_key: bytes | None = None, certificate_chain: bytes | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials when any TLS argument is given (None: plaintext). `private_key` and
    `certificate_chain` are the client's own certificate, for servers that require one."""
    if not tls and root_certificates is None and private_key is None and certificate_chain is None:
        return None
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("private_key and certificate_chain go together (the client certificate and its key)")
    return grpc.ssl_channel_credentials(root_certificates=root_certificates, private_key=private_key,
                                        certificate_chain=certificate_chain)


MAX_PAGES = 100_000  # a listing longer than this is a server that never ends it


def next_page(token: str, seen: set[str]) -> str:
    """The page token to ask for next ('' when the listing is done), refusing one that a
    broken server repeats (the listing would never end)."""
    if token and (token in seen or len(seen) >= MAX_PAGES):
        raise InternalError(grpc.StatusCode.INTERNAL, f"the server repeated the page token {token[:40]!r}; the listing "
                           "cannot go on", reason="PAGE_TOKEN_REPEATED")
    seen.add(token)
    return token


WAIT_BACKOFF_S = (0.05, 2.0)  # between WaitOperation calls that came back early: first and largest pause


def wait_pause(asked_s: float, took_s: float, previous: float) -> float:
    """How long to pause before the next WaitOperation: none when the last one waited as long as
    asked (the server long-polls), else a doubling pause (a server answering at once)."""
    if took_s >= 0.9 * asked_s:
        return 0.0
    low, high = WAIT_BACKOFF_S
    return min(high, max(low, 2 * previous))
