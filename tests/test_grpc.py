"""A real server on a loopback port, used through the client SDK."""

import asyncio
import json
import shutil

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import loramux.client as lc
from conftest import ADAPTERS, PROMPTS, loaded_client
from loramux.server.app import BackgroundServer

N = 8


@pytest.fixture(scope="module")
def server(assets, tmp_path_factory):
    settings = assets.settings(adapter_slots=3, merge_root=tmp_path_factory.mktemp("merged"), batch_window_ms=20,
                               hub_offline=True)  # hf:// from the (empty) cache: no network (test_hub.py goes online)
    srv = BackgroundServer(settings)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with loaded_client(server.target) as c:
        yield c


def expect_error(cls, reason, fn, *args, **kwargs):
    with pytest.raises(cls) as e:
        fn(*args, **kwargs)
    assert e.value.reason == reason, e.value
    return e.value


def test_generate_equals_peft_for_every_adapter(assets, client):
    for adapter in ["", *ADAPTERS]:
        result = client.generate(prompt=PROMPTS[1], adapter_id=adapter, max_new_tokens=N)
        assert result.token_ids == assets.oracle(adapter or None, PROMPTS[1], N), adapter
        assert result.usage == lc.Usage(len(assets.tokenizer(PROMPTS[1])["input_ids"]), len(result.token_ids))
        assert result.finish_reason in ("length", "stop_token")
        assert 0 <= result.timings.queue_wait_s <= result.timings.time_to_first_token_s <= result.timings.total_s


def test_stream_chunks_add_up_to_the_unary_result(client):
    unary = client.generate(prompt=PROMPTS[0], adapter_id="pattern", max_new_tokens=N, return_logprobs=True)
    chunks = list(client.generate_stream(prompt=PROMPTS[0], adapter_id="pattern", max_new_tokens=N, return_logprobs=True))
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == unary.finish_reason and chunks[-1].usage == unary.usage
    assert sum((c.token_ids for c in chunks), []) == unary.token_ids
    assert "".join(c.text for c in chunks) == unary.text
    assert pytest.approx(sum((c.logprobs for c in chunks), [])) == unary.logprobs
    assert len(unary.logprobs) == len(unary.token_ids) and all(lp <= 0 for lp in unary.logprobs)


def test_token_ids_and_chat_messages(assets, client):
    ids = assets.tokenizer(PROMPTS[2])["input_ids"]
    by_ids = client.generate(prompt_token_ids=ids, adapter_id="qv-r4", max_new_tokens=N)
    assert by_ids.token_ids == assets.oracle("qv-r4", PROMPTS[2], N)
    chat = client.generate(messages=[{"role": "user", "content": "hi"}], max_new_tokens=2)
    rendered = assets.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.usage.prompt_tokens == len(assets.tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_adapter_lifecycle_and_pagination(client):
    info = client.get_adapter("rslora-r8")
    assert (info.rank, info.alpha, info.use_rslora) == (8, 8.0, True)
    assert info.target_modules == ["gate_proj", "k_proj", "o_proj", "up_proj"]
    assert info.tier in ("accelerator", "host") and info.revision.startswith("sha256:")
    listed = client.list_adapters(page_size=2)
    assert [a.adapter_id for a in listed] == sorted(ADAPTERS)
    # same id, same source: idempotent; another source: ALREADY_EXISTS; replace: allowed
    assert client.load_adapter("qv-r4", source="qv-r4").revision == client.get_adapter("qv-r4").revision
    expect_error(lc.AlreadyExists, "ADAPTER_ALREADY_EXISTS", client.load_adapter, "qv-r4", source="mlp-r2")
    client.load_adapter("temp", source="mlp-r2", warm=True)
    assert client.get_adapter("temp").tier == "accelerator"
    replaced = client.load_adapter("temp", source="qv-r4", replace=True)
    assert replaced.source == "qv-r4" and replaced.rank == 4
    client.unload_adapter("temp")
    expect_error(lc.NotFound, "ADAPTER_NOT_FOUND", client.get_adapter, "temp")
    expect_error(lc.NotFound, "ADAPTER_NOT_FOUND", client.unload_adapter, "temp")


def test_pin_keeps_a_slot_and_has_a_limit(client, server):
    pinned = client.load_adapter("pinned", source="all-r16", pin=True)
    assert pinned.pinned and pinned.tier == "accelerator"
    for name in ADAPTERS:  # 5 adapters through the 2 remaining slots
        client.generate(prompt="fox", adapter_id=name, max_new_tokens=2)
    assert client.get_adapter("pinned").tier == "accelerator"
    client.load_adapter("pinned2", source="qv-r4", pin=True)
    err = expect_error(lc.FailedPrecondition, "PIN_LIMIT_REACHED", client.load_adapter, "pinned3", source="qv-r4", pin=True)
    assert err.metadata == {"pinned": "2", "adapter_slots": "3"}
    expect_error(lc.NotFound, "ADAPTER_NOT_FOUND", client.get_adapter, "pinned3")  # nothing left behind
    client.unload_adapter("pinned")
    client.unload_adapter("pinned2")
    snap = server.engine.cache.snapshot()
    assert snap.pinned == frozenset() and server.engine.cache.pinned_count() == 0


BAD_REQUESTS = [
    (lc.NotFound, "ADAPTER_NOT_FOUND", "adapter_id", dict(prompt="x", adapter_id="nope")),
    (lc.InvalidArgument, "PROMPT_REQUIRED", "prompt", dict()),
    (lc.InvalidArgument, "PROMPT_AMBIGUOUS", "prompt_token_ids", dict(prompt="x", prompt_token_ids=[1])),
    (lc.InvalidArgument, "INVALID_SAMPLING_PARAMETER", "temperature", dict(prompt="x", temperature=-1)),
    (lc.InvalidArgument, "INVALID_SAMPLING_PARAMETER", "top_p", dict(prompt="x", top_p=1.5)),
    (lc.InvalidArgument, "INVALID_SAMPLING_PARAMETER", "max_new_tokens", dict(prompt="x", max_new_tokens=-3)),
    (lc.InvalidArgument, "TOKEN_ID_OUT_OF_RANGE", "prompt_token_ids", dict(prompt_token_ids=[1, 99999])),
    (lc.InvalidArgument, "PROMPT_TOO_LONG", "prompt_token_ids", dict(prompt_token_ids=[5] * 300)),
    (lc.InvalidArgument, "MESSAGE_ROLE_REQUIRED", "messages[0].role", dict(messages=[("", "hi")])),
]


@pytest.mark.parametrize("cls,reason,field,kwargs", BAD_REQUESTS, ids=[b[1] + "-" + b[2] for b in BAD_REQUESTS])
def test_bad_generate_requests(client, cls, reason, field, kwargs):
    err = expect_error(cls, reason, client.generate, **kwargs)
    assert [f for f, _ in err.field_violations] == [field]
    # and the server keeps serving
    assert client.generate(prompt="fox", max_new_tokens=1).usage.completion_tokens == 1


def test_bad_adapters_are_refused_and_leave_nothing(assets, client, tmp_path):
    corrupt = assets.copy_adapter("qv-r4", "grpc-corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    assets.copy_adapter("all-r16", "grpc-other-base")
    cfg_path = assets.adapters / "grpc-other-base" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "other-org/other-model"
    cfg_path.write_text(json.dumps(cfg))
    outside = tmp_path / "outside"
    shutil.copytree(assets.adapters / "qv-r4", outside)
    (assets.adapters / "escape").symlink_to(outside)
    cases = [
        (lc.InvalidArgument, "ADAPTER_CORRUPT", "grpc-corrupt"),
        (lc.FailedPrecondition, "ADAPTER_INCOMPATIBLE", "grpc-other-base"),
        (lc.InvalidArgument, "SOURCE_OUTSIDE_ROOT", str(outside)),
        (lc.InvalidArgument, "SOURCE_OUTSIDE_ROOT", "../outside"),
        (lc.InvalidArgument, "SOURCE_OUTSIDE_ROOT", "escape"),
        (lc.NotFound, "SOURCE_NOT_FOUND", "no-such-adapter"),
        (lc.NotFound, "SOURCE_NOT_FOUND", "hf://nobody/nothing"),
    ]
    for cls, reason, source in cases:
        expect_error(cls, reason, client.load_adapter, "bad", source=source)
        expect_error(lc.NotFound, "ADAPTER_NOT_FOUND", client.get_adapter, "bad")
    expect_error(lc.InvalidArgument, "ADAPTER_ID_INVALID", client.load_adapter, "../x", source="qv-r4")
    assert sorted(a.adapter_id for a in client.list_adapters()) == sorted(ADAPTERS)
    assert client.generate(prompt="fox", adapter_id="qv-r4", max_new_tokens=N).token_ids == assets.oracle("qv-r4", "fox", N)


def test_rank_above_limit_via_grpc(assets, tmp_path):
    with BackgroundServer(assets.settings(max_lora_rank=8)) as srv, lc.Client(srv.target) as c:
        err = expect_error(lc.FailedPrecondition, "ADAPTER_RANK_TOO_LARGE", c.load_adapter, "big", source="all-r16")
        assert err.metadata["max_lora_rank"] == "8"


def test_merge_writes_a_checkpoint_with_base_plus_adapter_logits(assets, client, server):
    handle = client.merge("all-r16", "merged-all")
    result = handle.result(timeout=120)
    assert result.merged_tensors == 2 * 7 and "model.safetensors" in result.files and "config.json" in result.files
    progress = handle.progress()
    assert progress.done and progress.phase == "done" and progress.percent == 100.0
    assert progress.tensors_done == progress.tensors_total > 0
    from transformers import AutoModelForCausalLM

    assert result.output_path == "merged-all"  # under the tenant's directory of the merge root
    merged = AutoModelForCausalLM.from_pretrained(server.engine.settings.merge_root / "default" / result.output_path,
                                                  dtype=torch.float32).eval()
    ids = assets.tokenizer(PROMPTS[3], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = assets.peft_model("all-r16")(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    # output exists; outside the root; unknown adapter
    expect_error(lc.AlreadyExists, "MERGE_OUTPUT_EXISTS", client.merge, "all-r16", "merged-all")
    expect_error(lc.InvalidArgument, "OUTPUT_OUTSIDE_ROOT", client.merge, "all-r16", "../elsewhere")
    expect_error(lc.NotFound, "ADAPTER_NOT_FOUND", client.merge, "nope", "m2")
    assert [p.name for p in server.engine.settings.merge_root.iterdir()] == ["default"]  # the tenant's directory
    names = [p.name for p in (server.engine.settings.merge_root / "default").iterdir()]
    assert names == ["merged-all"]  # no temporary directories left


def test_operations_service_and_merge_off(assets, client, server):
    from google.longrunning import operations_pb2, operations_pb2_grpc

    handle = client.merge("qv-r4", "merged-qv")
    handle.result(timeout=120)
    with grpc.insecure_channel(server.target) as ch:
        ops = operations_pb2_grpc.OperationsStub(ch)
        listed = ops.ListOperations(operations_pb2.ListOperationsRequest())
        assert handle.name in [op.name for op in listed.operations]
        assert ops.WaitOperation(operations_pb2.WaitOperationRequest(name=handle.name)).done
        with pytest.raises(grpc.RpcError) as e:
            ops.GetOperation(operations_pb2.GetOperationRequest(name="operations/none"))
        assert lc.errors.from_rpc_error(e.value).reason == "OPERATION_NOT_FOUND"
    with BackgroundServer(assets.settings()) as srv, lc.Client(srv.target) as c:
        c.load_adapter("qv-r4", source="qv-r4")
        expect_error(lc.FailedPrecondition, "MERGE_NOT_CONFIGURED", c.merge, "qv-r4", "x")


def test_deadline_exceeded(client):
    with pytest.raises(lc.DeadlineExceeded):
        client.generate(prompt="fox", max_new_tokens=200, timeout=0.05)
    assert client.generate(prompt="fox", max_new_tokens=1).usage.completion_tokens == 1


def test_health_reflection_and_server_info(client, server):
    with grpc.insecure_channel(server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "loramux.v1.Loramux"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"loramux.v1.Loramux", "google.longrunning.Operations", "grpc.health.v1.Health"} <= names
    info = client.server_info()
    assert (info.device, info.dtype, info.adapter_slots, info.max_lora_rank) == ("cpu", "float32", 3, 16)
    assert info.target_modules == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert info.max_sequence_length == 256 and "torch" in info.versions and info.engine_process is False


def test_async_client(assets, server):
    async def main():
        async with lc.AsyncClient(server.target) as c:
            result = await c.generate(prompt=PROMPTS[0], adapter_id="mlp-r2", max_new_tokens=N)
            chunks = [ch async for ch in c.generate_stream(prompt=PROMPTS[0], adapter_id="mlp-r2", max_new_tokens=N)]
            try:
                await c.get_adapter("nope")
            except lc.NotFound as e:
                reason = e.reason
            return result, chunks, reason

    result, chunks, reason = asyncio.run(main())
    assert result.token_ids == assets.oracle("mlp-r2", PROMPTS[0], N)
    assert sum((c.token_ids for c in chunks), []) == result.token_ids and reason == "ADAPTER_NOT_FOUND"


def test_hub_source_from_local_cache(assets, tmp_path):
    """hf:// sources resolve through huggingface_hub, offline from a local HF cache layout."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--qv-adapter"
    snapshot = repo / "snapshots" / sha
    shutil.copytree(assets.adapters / "qv-r4", snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    settings = assets.settings(hub_cache_dir=tmp_path / "hub", hub_offline=True)
    with BackgroundServer(settings) as srv, lc.Client(srv.target) as c:
        info = c.load_adapter("from-hub", source="hf://acme/qv-adapter")
        assert info.revision == sha and info.rank == 4
        assert c.generate(prompt="fox", adapter_id="from-hub", max_new_tokens=N).token_ids == assets.oracle("qv-r4", "fox", N)
        expect_error(lc.NotFound, "SOURCE_NOT_FOUND", c.load_adapter, "x", source="hf://acme/qv-adapter", revision="v9")
        # A hostile config arrives through the Hub as well: refused quickly, with the same reason.
        evil_sha = "f" * 40
        evil = repo / "snapshots" / evil_sha
        shutil.copytree(assets.adapters / "qv-r4", evil)
        config = json.loads((evil / "adapter_config.json").read_text())
        config["target_modules"] = "([a-z._0-9]+)+Z"
        (evil / "adapter_config.json").write_text(json.dumps(config))
        expect_error(lc.InvalidArgument, "ADAPTER_CONFIG_INVALID", c.load_adapter, "evil", source="hf://acme/qv-adapter", revision=evil_sha)
        # A snapshot file that links out of the repository's cache folder is refused.
        (evil / "adapter_config.json").unlink()
        (evil / "adapter_config.json").symlink_to(assets.adapters / "qv-r4" / "adapter_config.json")
        expect_error(lc.InvalidArgument, "SOURCE_OUTSIDE_ROOT", c.load_adapter, "evil", source="hf://acme/qv-adapter", revision=evil_sha)


def test_abandoned_stream_releases_its_row_and_adapter(client, server):
    import time

    full = client.generate(prompt="fox", adapter_id="qv-r4", max_new_tokens=240)
    assert full.usage.completion_tokens == 240  # long enough that finishing is not mistaken for cancelling
    stream = client.generate_stream(prompt="fox", adapter_id="qv-r4", max_new_tokens=240)
    first = next(stream)
    assert first.token_ids and first.finish_reason is None
    closed = time.monotonic()
    stream.close()  # cancels the call; the engine drops the row at its next step
    while server.engine.cache.snapshot().in_use and time.monotonic() - closed < 10:
        time.sleep(0.005)
    released_after = time.monotonic() - closed
    assert server.engine.cache.snapshot().in_use == {}
    assert released_after < full.timings.total_s / 3, (released_after, full.timings.total_s)
    assert client.generate(prompt="fox", max_new_tokens=1).usage.completion_tokens == 1
