"""Protobuf messages <-> domain objects."""

from __future__ import annotations

import base64
import dataclasses
import importlib.metadata
import json

from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.longrunning import operations_pb2

from loramux.server.grpc_api.status import to_status
from loramux.server.engine.facade import (
    AdapterInfo, Combination, Constraint, FinishReason, GenerateInput, MergeJob, MergeResult, Operation, ServerInfo, Tier, Timings,
)
from loramux.server.errors import InvalidRequest
from loramux.v1 import adapter_pb2, generation_pb2, loramux_service_pb2

_TIERS = {
    Tier.ACCELERATOR: adapter_pb2.TIER_ACCELERATOR,
    Tier.HOST: adapter_pb2.TIER_HOST,
    Tier.DISK: adapter_pb2.TIER_DISK,
}
_FINISH = {
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_TOKEN: generation_pb2.FINISH_REASON_STOP_TOKEN,
    FinishReason.STOP_SEQUENCE: generation_pb2.FINISH_REASON_STOP_SEQUENCE,
}
_PHASES = {
    "queued": loramux_service_pb2.MergeMetadata.PHASE_QUEUED,
    "merging": loramux_service_pb2.MergeMetadata.PHASE_MERGING,
    "writing_config": loramux_service_pb2.MergeMetadata.PHASE_WRITING_CONFIG,
    "done": loramux_service_pb2.MergeMetadata.PHASE_DONE,
    "verifying": loramux_service_pb2.MergeMetadata.PHASE_VERIFYING,
    "registering": loramux_service_pb2.MergeMetadata.PHASE_REGISTERING,
}
VERSIONED_PACKAGES = ("loramux", "torch", "transformers", "peft", "safetensors", "grpcio", "protobuf")


def generate_input(req: generation_pb2.GenerateRequest) -> GenerateInput:
    return GenerateInput(
        adapter_id=req.adapter_id,
        prompt=req.prompt,
        prompt_token_ids=list(req.prompt_token_ids),
        **_chat_fields(req),
        max_new_tokens=req.max_new_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed if req.HasField("seed") else None,
        stop=list(req.stop),
        stop_token_ids=list(req.stop_token_ids),
        return_logprobs=req.return_logprobs,
        ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        min_p=req.min_p,
        logit_bias=dict(req.logit_bias),
        min_tokens=req.min_tokens,
        top_logprobs=req.top_logprobs,
        constraint=_constraint(req),
        prompt_logprobs=req.prompt_logprobs if req.HasField("prompt_logprobs") else None,
    )


def _constraint(req: generation_pb2.GenerateRequest) -> Constraint | None:
    if not req.HasField("structured_output"):
        return None
    so = req.structured_output
    kind = so.WhichOneof("kind")
    if kind is None or (kind == "json_object" and not so.json_object):
        return None
    if kind == "choice":
        return Constraint("choice", json.dumps(list(so.choice.choices)))
    return Constraint(kind, "" if kind == "json_object" else getattr(so, kind))


def tokenize_input(req: generation_pb2.TokenizeRequest) -> GenerateInput:
    return GenerateInput(adapter_id=req.adapter_id, prompt=req.prompt, **_chat_fields(req))


def _chat_fields(req: generation_pb2.GenerateRequest | generation_pb2.TokenizeRequest) -> dict:
    """The chat fields both requests carry, their JSON parsed and checked."""
    return dict(
        messages=[(m.role, m.content) for m in req.messages],
        message_extras=[_json(m.extra_json, f"messages[{i}].extra_json", dict) for i, m in enumerate(req.messages)],
        tools=_json(req.tools_json, "tools_json", list),
        chat_template_kwargs=_json(req.chat_template_kwargs_json, "chat_template_kwargs_json", dict),
    )


def _json(text: str, field: str, kind: type):
    """A JSON field of the request (empty: an empty `kind`)."""
    if not text:
        return kind()
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidRequest(f"{field} is not valid JSON", field=field, reason="MALFORMED_REQUEST") from None
    if not isinstance(value, kind):
        raise InvalidRequest(f"{field} must be a JSON {'object' if kind is dict else 'array'}", field=field,
                             reason="INVALID_PARAMETER")
    return value


def finish_reason(reason: FinishReason) -> int:
    return _FINISH[reason]


def usage(prompt_tokens: int, completion_tokens: int) -> generation_pb2.Usage:
    return generation_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def timings(t: Timings) -> generation_pb2.Timings:
    def dur(seconds: float) -> duration_pb2.Duration:
        d = duration_pb2.Duration()
        d.FromNanoseconds(int(max(seconds, 0.0) * 1e9))
        return d

    return generation_pb2.Timings(
        queue_wait=dur(t.queue_wait_s), time_to_first_token=dur(t.time_to_first_token_s), total=dur(t.total_s)
    )


def _timestamp(epoch: float | None) -> timestamp_pb2.Timestamp | None:
    if epoch is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(epoch * 1e9))
    return ts


def adapter(info: AdapterInfo) -> adapter_pb2.Adapter:
    return adapter_pb2.Adapter(
        adapter_id=info.adapter_id,
        source=info.source,
        revision=info.revision,
        rank=info.rank,
        alpha=info.alpha,
        target_modules=list(info.target_modules),
        size_bytes=info.size_bytes,
        tier=_TIERS[info.tier],
        pinned=info.pinned,
        last_used_time=_timestamp(info.last_used),
        use_count=info.use_count,
        use_rslora=info.use_rslora,
        base_model=info.base_model,
        load_time=_timestamp(info.load_time),
    )


def server_info(info: ServerInfo) -> loramux_service_pb2.ServerInfo:
    fields = dataclasses.asdict(info)
    fields["target_modules"] = list(info.target_modules)
    return loramux_service_pb2.ServerInfo(**fields, versions=versions())


def page_request(page_size: int, page_token: str) -> tuple[int, str]:
    """AIP-158: (page size, the last key the previous page ended at); tokens are opaque."""
    if page_size < 0:
        raise InvalidRequest(f"page_size must be >= 0, got {page_size}", field="page_size", reason="INVALID_PAGE_SIZE")
    after = ""
    if page_token:
        try:
            after = base64.urlsafe_b64decode(page_token.encode()).decode()
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidRequest("page_token is not a token this server issued", field="page_token", reason="INVALID_PAGE_TOKEN") from e
    return min(page_size or 50, 1000), after


def page_token(last_key: str | None, more: bool) -> str:
    return base64.urlsafe_b64encode(last_key.encode()).decode() if more and last_key else ""


def page(items: list, page_size: int, page_token_: str, key) -> tuple[list, str]:
    """AIP-158 pagination over items sorted by `key`."""
    size, after = page_request(page_size, page_token_)
    start = next((i for i, item in enumerate(items) if key(item) > after), len(items)) if after else 0
    chosen = items[start : start + size]
    more = start + size < len(items)
    return chosen, page_token(key(chosen[-1]) if chosen else None, more)


def merge_job(request) -> MergeJob:
    c = request.combination if request.HasField("combination") else None
    combination = None
    if c is not None:
        combination = Combination(
            method=c.method, weights=tuple(a.weight for a in c.adapters), svd_rank=c.svd_rank or None,
            svd_clamp=c.svd_clamp or None, density=c.density or None, majority_sign_method=c.majority_sign_method or "total",
            seed=c.seed,
        )
    return MergeJob(
        output_dir=request.output_dir, adapter_id=request.adapter_id,
        inputs=tuple(a.adapter_id for a in c.adapters) if c is not None else (), combination=combination,
        overwrite=request.overwrite, max_shard_bytes=request.max_shard_bytes, verify=request.verify,
        adapter_only=request.adapter_only, register_as=request.register_as,
    )


def operation(op: Operation) -> operations_pb2.Operation:
    m = op.metadata
    done, total = m.get("bytes_done", 0), m.get("bytes_total", 0)
    metadata = loramux_service_pb2.MergeMetadata(
        adapter_id=m.get("adapter_id", ""),
        output_dir=m.get("output_dir", ""),
        phase=_PHASES.get(m.get("phase", ""), 0),
        tensors_done=m.get("tensors_done", 0),
        tensors_total=m.get("tensors_total", 0),
        bytes_done=done,
        bytes_total=total,
        progress_percent=100.0 if op.done and op.error is None else (100.0 * done / total if total else 0.0),
        create_time=_timestamp(op.create_time),
        end_time=_timestamp(op.end_time),
    )
    msg = operations_pb2.Operation(name=op.name, done=op.done)
    msg.metadata.Pack(metadata)
    if op.error is not None:
        msg.error.CopyFrom(to_status(op.error))
    elif op.done and isinstance(op.result, MergeResult):
        r = op.result
        any_response = any_pb2.Any()
        any_response.Pack(
            loramux_service_pb2.MergeResponse(
                output_path=r.output_dir or m.get("output_dir", ""), files=list(r.files), size_bytes=r.size_bytes, merged_tensors=r.merged_tensors,
                manifest_sha256=r.manifest_sha256, verified=r.max_logit_difference is not None,
                max_logit_difference=r.max_logit_difference or 0.0,
            )
        )
        msg.response.CopyFrom(any_response)
    return msg


def versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
