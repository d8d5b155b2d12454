"""One caller cannot hurt another: a real server on loopback, hostile requests beside good ones."""

import contextlib
import queue
import threading
from pathlib import Path

import grpc
import pytest
import torch
from grpc_status import rpc_status
from google.rpc import error_details_pb2
from safetensors.torch import load_file, save_file

import loramux.client as lc
from conftest import ADAPTERS, PROMPTS, loaded_client
from loramux.server.app import BackgroundServer
from loramux.server.engine.batch import Batch
from loramux.server.engine.inputs import GenerateInput
from loramux.server.engine.request import ErrorEvent, FinishEvent

N = 8


@pytest.fixture(scope="module")
def server(assets, tmp_path_factory):
    overflow = assets.copy_adapter("qv-r4", "overflow")
    tensors = load_file(str(overflow / "adapter_model.safetensors"))
    save_file({k: v * 1e20 for k, v in tensors.items()}, str(overflow / "adapter_model.safetensors"))
    settings = assets.settings(
        adapter_slots=3, merge_root=tmp_path_factory.mktemp("merged"), batch_window_ms=50, max_prompt_bytes=4096,
        slot_wait_s=0.2,
    )
    srv = BackgroundServer(settings)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with loaded_client(server.target, [*ADAPTERS, "overflow"]) as c:
        yield c


def books_balance(engine):
    """The cache's books agree with each other and with the registry."""
    cache, registry = engine.cache, engine.registry
    assert cache.audit() == []
    live = {r.uid for t in ("default", "t1", "t2") for r in registry.list(t)}
    assert cache.registered() == live
    usage = cache.usage()
    assert sum(n for n, _ in usage.values()) == len(live)
    assert cache.snapshot().pinned == {r.uid for t in ("default", "t1", "t2") for r in registry.list(t) if r.pinned}


@contextlib.contextmanager
def engine_paused(engine):
    """Hold the engine thread in a job, so that submitted requests stay queued until the block ends."""
    gate, entered = threading.Event(), threading.Event()
    future = engine.call_on_engine(lambda: (entered.set(), gate.wait(30)))
    assert entered.wait(10)
    try:
        yield
    finally:
        gate.set()
        future.result(10)


def run_together(server, calls: dict) -> dict:
    """Each of `calls` (name -> function) on its own thread while the engine is held, so all are
    queued, then prefilled and decoded together; name -> what it returned."""
    results: dict[str, object] = {}
    with engine_paused(server.engine):
        threads = [threading.Thread(target=lambda n=n, f=f: results.__setitem__(n, f())) for n, f in calls.items()]
        for t in threads:
            t.start()
        while server.engine.stats().waiting < len(calls):
            threading.Event().wait(0.01)
    for t in threads:
        t.join(30)
    return results


def expect(reason, fn, *args, **kwargs):
    with pytest.raises(lc.LoramuxError) as e:
        fn(*args, **kwargs)
    assert e.value.reason == reason, e.value
    return e.value


def test_a_non_finite_row_fails_alone_and_its_batch_mates_equal_peft(assets, server, client):
    def run(adapter):
        try:
            return client.generate(prompt=PROMPTS[1], adapter_id=adapter, max_new_tokens=N)
        except lc.LoramuxError as e:
            return e

    results = run_together(server, {n: lambda a=a: run(a) for n, a in
                                     (("base", ""), ("qv", "qv-r4"), ("bad", "overflow"), ("all", "all-r16"))})
    assert isinstance(results["bad"], lc.LoramuxError) and results["bad"].reason == "NON_FINITE_LOGITS"
    assert results["bad"].code == grpc.StatusCode.FAILED_PRECONDITION
    for name, adapter in (("base", None), ("qv", "qv-r4"), ("all", "all-r16")):
        assert results[name].token_ids == assets.oracle(adapter, PROMPTS[1], N), name
    assert server.engine.stats().prefills >= 1
    books_balance(server.engine)



def _overflowing_adapter(assets, name, victim):
    """An adapter equal to the base model (B = 0, peft's initial B) whose A on layer 0's q_proj
    holds one huge finite value at input feature d: x @ A overflows exactly when |x_d| exceeds a
    threshold. d and the threshold are picked from the model so that some prompt's own tokens
    stay below it and its first generated token, and `victim`'s, go above: the adapter's row
    passes prefill and overflows at its first decode step. Returns that prompt."""
    model = assets.peft_model(None)
    inner = model.model

    def features(ids):  # what layer 0's q_proj reads for each token
        with torch.no_grad():
            return inner.layers[0].input_layernorm(inner.embed_tokens(torch.tensor(ids))).abs()

    victim_first = assets.oracle(victim[0], victim[1], 1)[0]
    for prompt in PROMPTS:
        ids = assets.tokenizer(prompt)["input_ids"]
        first = assets.oracle(None, prompt, 1)[0]
        below = features(ids).max(dim=0).values  # [hidden]
        above = torch.minimum(features([first])[0], features([victim_first])[0])
        # A threshold of at least 1: the huge value itself (at most float32's largest) is finite.
        threshold = (above * below).sqrt().clamp(min=1.0)
        d = int((above / threshold).argmax())
        if above[d] > 1.2 * threshold[d] and 1.2 * below[d] < threshold[d]:
            break
    else:
        raise AssertionError("no prompt whose first generated token stands out in some feature")
    threshold = float(threshold[d])
    path = assets.copy_adapter("qv-r4", name)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    for key in tensors:
        tensors[key] = torch.zeros_like(tensors[key])
        if "layers.0.self_attn.q_proj.lora_A" in key:
            tensors[key][0, d] = torch.finfo(torch.float32).max / threshold
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return prompt


def test_an_adapter_overflowing_mid_decode_fails_only_its_own_row(assets, server, client):
    """The decode step reads every adapter of the batch for every row and keeps each row's own
    columns. An adapter whose x @ A overflows to inf (finite weights, so loading accepts it) must
    fail only its own request: not its batch mates, which read its columns too, and not a later
    batch while its columns are still in the decode buffer."""
    victim = ("all-r16", PROMPTS[1])
    prompt = _overflowing_adapter(assets, "overflow-mid", victim)
    client.load_adapter("overflow-mid", source="overflow-mid")
    try:
        def run(adapter, text):
            chunks = []
            try:  # two tokens: the prefill's and one decode step's, so the buffer is not yet rebuilt
                for chunk in client.generate_stream(prompt=text, adapter_id=adapter, max_new_tokens=2):
                    chunks.extend(chunk.token_ids)
                return chunks
            except lc.LoramuxError as e:
                return chunks, e

        results = run_together(server, {"bad": lambda: run("overflow-mid", prompt), "base": lambda: run("", prompt),
                                        "victim": lambda: run(*victim)})
        tokens, error = results["bad"]
        assert error.reason == "NON_FINITE_LOGITS" and tokens == assets.oracle(None, prompt, 1)  # failed at its first decode step
        assert results["base"] == assets.oracle(None, prompt, 2)  # read the same feature as the bad row
        assert results["victim"] == assets.oracle(*victim, 2)  # its first generated token did too
        # The bad row is gone; its columns are dead but still in layer 0's decode buffer, and the
        # victim's next request reads them at its first decode step.
        bank = server.engine.base.bank
        uid = server.engine.registry.get("default", "overflow-mid").uid
        assert bank.layers["model.layers.0.self_attn.q_proj"]._col_slot.eq(bank._slot_of[uid]).any()
        assert client.generate(prompt=victim[1], adapter_id=victim[0], max_new_tokens=N).token_ids == assets.oracle(*victim, N)
    finally:
        client.unload_adapter("overflow-mid")
    books_balance(server.engine)


def test_numeric_extremes_refused_at_the_edge(client):
    for field, value in (("temperature", 1e-30), ("temperature", 1e9), ("repetition_penalty", 1e-30),
                         ("repetition_penalty", 1e30), ("temperature", float("nan")), ("top_p", 2.0)):
        error = expect("INVALID_SAMPLING_PARAMETER", client.generate, prompt="x", **{field: value})
        assert error.field_violations[0][0] == field
    expect("INVALID_SAMPLING_PARAMETER", client.generate, prompt="x", stop_token_ids=list(range(300)))
    # The documented bounds themselves, as a float32 field carries them, are accepted.
    for field, value in (("repetition_penalty", 0.01), ("repetition_penalty", 100.0), ("temperature", 0.001)):
        assert len(client.generate(prompt="x", max_new_tokens=2, **{field: value}).token_ids) <= 2


def test_large_prompts_refused_before_tokenizing(client, server):
    error = expect("PROMPT_TOO_LONG", client.generate, prompt="a" * 4097)
    assert error.metadata["max_prompt_bytes"] == "4096"
    expect("PROMPT_TOO_LONG", client.generate, messages=[{"role": "user", "content": "b" * 5000}])
    expect("PROMPT_TOO_LONG", client.generate, prompt_token_ids=[1] * 100_000)
    big = "c" * (16 << 20)  # past the transport's limit: refused by gRPC itself, the server unharmed
    with pytest.raises(lc.LoramuxError) as e:
        client.generate(prompt=big)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.generate(prompt=PROMPTS[0], max_new_tokens=2).usage.completion_tokens == 2


def _raw_call(target, method, body):
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method)
        with pytest.raises(grpc.RpcError) as e:
            call(body, timeout=10)
    status = rpc_status.from_call(e.value)
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return e.value.code(), info.reason


def test_garbage_protobuf_is_invalid_argument(server):
    for method in ("/loramux.v1.Loramux/Generate", "/loramux.v1.Loramux/LoadAdapter",
                   "/google.longrunning.Operations/GetOperation"):
        for body in (b"\xff\xff\xff\xff", b"\x12\x05ab", b"\x0a\x02\xc3\x28"):  # bad tag, short field, bad UTF-8
            assert _raw_call(server.target, method, body) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")


def test_paths_and_ids_validated_on_every_rpc(assets, client, server):
    for source, reason in (("qv\0r4", "SOURCE_INVALID"), ("x" * 5000, "SOURCE_INVALID"), ("a/" + "y" * 300, "SOURCE_INVALID"),
                           ("../../../../etc", "SOURCE_OUTSIDE_ROOT"), ("/proc/self/cwd", "SOURCE_OUTSIDE_ROOT")):
        error = expect(reason, client.load_adapter, "fine", source=source)
        # No resolved server path: not the adapter root's, not where /proc/self/cwd leads.
        assert error.field_violations[0][0] == "source"
        assert str(assets.adapters) not in str(error) and str(Path.cwd()) not in str(error)
    for fn in (client.get_adapter, client.unload_adapter):
        error = expect("ADAPTER_ID_INVALID", fn, "z" * 100_000)
        assert len(str(error)) < 2000 and all(len(v) <= 256 for v in error.metadata.values())
    expect("ADAPTER_ID_INVALID", client.generate, prompt="x", adapter_id="bad id\0")
    expect("ADAPTER_ID_INVALID", client.merge, "bad\nid", "out")
    for output, reason in (("out\0", "OUTPUT_DIR_INVALID"), ("o" * 300, "OUTPUT_DIR_INVALID"), ("../x", "OUTPUT_OUTSIDE_ROOT")):
        expect(reason, client.merge, "qv-r4", output)
    from google.longrunning import operations_pb2

    body = operations_pb2.GetOperationRequest(name="operations/" + "q" * 100_000).SerializeToString()
    assert _raw_call(server.target, "/google.longrunning.Operations/GetOperation", body) == (
        grpc.StatusCode.NOT_FOUND, "OPERATION_NOT_FOUND")
    assert "/" not in client.server_info().model_id


def test_warm_and_pin_without_a_free_slot_answer_retriable_and_keep_the_registration(server, client):
    engine = server.engine
    held = [engine.registry.get("default", a).uid for a in ("qv-r4", "pattern", "mlp-r2")]
    for uid in held:  # running requests' way of holding slots, done directly on the engine thread
        engine.cache.ensure_in_memory(uid)
        engine.call_on_engine(lambda uid=uid: engine.cache.acquire(uid)).result()
    try:
        error = expect("NO_SLOT_AVAILABLE", client.load_adapter, "warm-me", source="rslora-r8", warm=True)
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after is not None
        assert client.get_adapter("warm-me").tier in ("host", "disk")
        expect("NO_SLOT_AVAILABLE", client.load_adapter, "warm-me", source="rslora-r8", pin=True)
        assert not client.get_adapter("warm-me").pinned and engine.cache.pinned_count() == 0
    finally:
        for uid in held:
            engine.call_on_engine(lambda uid=uid: engine.cache.release(uid)).result()
    assert client.load_adapter("warm-me", source="rslora-r8", pin=True).pinned
    assert engine.cache.pinned_count() == 1
    client.load_adapter("pin-2", source="qv-r4", pin=True)  # 3 slots: 2 may be pinned
    expect("PIN_LIMIT_REACHED", client.load_adapter, "pin-3", source="mlp-r2", pin=True)
    assert client.load_adapter("warm-me", source="rslora-r8", pin=True).pinned  # again: a no-op, not a refusal
    client.unload_adapter("pin-2")
    client.unload_adapter("warm-me")
    assert engine.cache.pinned_count() == 0
    books_balance(engine)


def test_replace_lets_queued_requests_run_on_the_new_version(assets, server, client):
    client.load_adapter("swap", source="qv-r4")
    events: queue.Queue = queue.Queue()
    with engine_paused(server.engine):
        server.engine.submit("default", GenerateInput(adapter_id="swap", prompt=PROMPTS[2], max_new_tokens=N), events.put)
        client.load_adapter("swap", source="pattern", replace=True)
    tokens = []
    while True:
        event = events.get(timeout=30)
        assert not isinstance(event, ErrorEvent), event.error
        if isinstance(event, FinishEvent):
            break
        tokens += event.token_ids
    assert tokens == assets.oracle("pattern", PROMPTS[2], N)
    client.unload_adapter("swap")
    books_balance(server.engine)


def test_unloading_an_adapter_mid_stream_leaves_no_phantom(assets, server, client):
    client.load_adapter("brief", source="all-r16")
    stream = client.generate_stream(prompt=PROMPTS[0], adapter_id="brief", max_new_tokens=40)
    first = next(stream)
    client.unload_adapter("brief")
    rest = list(stream)
    assert rest[-1].finish_reason in ("length", "stop_token")
    assert first.token_ids + sum((c.token_ids for c in rest), []) == assets.oracle("all-r16", PROMPTS[0], 40)[: 1 + sum(len(c.token_ids) for c in rest)]
    books_balance(server.engine)
    assert server.engine.cache.snapshot().in_use == {}


def test_a_failed_join_fails_only_the_joining_requests(assets, server, monkeypatch):
    engine = server.engine
    long_events: queue.Queue = queue.Queue()
    engine.submit("t1", GenerateInput(adapter_id="", prompt=PROMPTS[3], max_new_tokens=60), long_events.put)
    first = long_events.get(timeout=30)
    assert first.token_ids

    calls = {"n": 0}
    original = Batch.concatenate

    def failing(self, other):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return original(self, other)

    monkeypatch.setattr(Batch, "concatenate", failing)
    joiners = [queue.Queue() for _ in range(2)]
    for q, adapter in zip(joiners, ("qv-r4", "mlp-r2")):
        engine.submit("default", GenerateInput(adapter_id=adapter, prompt=PROMPTS[0], max_new_tokens=N), q.put)
    for q in joiners:  # prefill sent each its first token; then the join failed and ended them
        event = q.get(timeout=30)
        while not isinstance(event, (ErrorEvent, FinishEvent)):
            event = q.get(timeout=30)
        assert isinstance(event, ErrorEvent) and event.error.reason == "OUT_OF_MEMORY"
        assert event.error.retry_after_s == 1.0
    tokens = list(first.token_ids)
    while True:
        event = long_events.get(timeout=30)
        assert not isinstance(event, ErrorEvent)
        if isinstance(event, FinishEvent):
            break
        tokens += event.token_ids
    assert tokens == assets.oracle(None, PROMPTS[3], 60)[: len(tokens)] and len(tokens) == event.completion_tokens
    assert calls["n"] == 1
    books_balance(engine)
    assert engine.cache.snapshot().in_use == {}


def test_a_failed_step_answers_its_rows_with_a_correlation_id_and_serving_goes_on(assets, server, client, monkeypatch):
    original = Batch.step
    calls = {"n": 0}

    def failing(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("a bug in the model code")
        return original(self)

    monkeypatch.setattr(Batch, "step", failing)
    error = expect("INTERNAL", client.generate, prompt=PROMPTS[1], adapter_id="qv-r4", max_new_tokens=N)
    assert len(error.metadata["correlation_id"]) == 16 and "bug" not in str(error)
    monkeypatch.setattr(Batch, "step", original)
    assert client.generate(prompt=PROMPTS[1], adapter_id="qv-r4", max_new_tokens=N).token_ids == assets.oracle("qv-r4", PROMPTS[1], N)
    books_balance(server.engine)


def test_merges_to_one_output_are_serialized_and_overwrite_only_replaces_merges(server, client):
    root = server.engine.settings.merge_root / "default"  # the tenant's own directory of the merge root
    root.mkdir(exist_ok=True)
    (root / "foreign").mkdir()
    (root / "foreign" / "precious.txt").write_text("not a merge")
    expect("MERGE_OUTPUT_EXISTS", client.merge, "qv-r4", "foreign")
    expect("MERGE_OUTPUT_NOT_A_MERGE", client.merge, "qv-r4", "foreign", overwrite=True)
    assert (root / "foreign" / "precious.txt").read_text() == "not a merge"

    first = client.merge("qv-r4", "same")
    second_error = None
    try:
        client.merge("pattern", "same")
    except lc.LoramuxError as e:
        second_error = e
    first.result(timeout=60)
    if second_error is None:  # the first had already finished: the second must then have been refused later
        pytest.fail("a second merge to an existing output without overwrite was accepted")
    assert second_error.reason == "MERGE_OUTPUT_EXISTS"
    again = client.merge("pattern", "same", overwrite=True).result(timeout=60)
    assert (root / "same" / "loramux_merge.json").read_text().count('"adapter_id": "pattern"') == 1
    assert again.output_path == "same"
    assert not [p for p in root.iterdir() if p.name.startswith(".loramux-merge")]


def test_slow_calls_do_not_starve_generate(server, client):
    """Adapter loads stuck waiting for a slot and many WaitOperation calls hold no thread that a
    Generate needs: a Generate is answered while they all still wait."""
    engine = server.engine
    held = [engine.registry.get("default", a).uid for a in ("qv-r4", "pattern", "mlp-r2")]
    for uid in held:
        engine.cache.ensure_in_memory(uid)
        engine.call_on_engine(lambda uid=uid: engine.cache.acquire(uid)).result()
    op = engine.operations.create("default", "merge", {"adapter_id": "x", "output_dir": "y", "phase": "queued"})
    finished: queue.Queue = queue.Queue()

    def slow_load(i):
        with lc.Client(server.target, timeout=30) as c:
            try:
                c.load_adapter(f"slow-{i}", source="rslora-r8", warm=True, timeout=30)
                finished.put(("load", "OK"))
            except lc.LoramuxError as e:
                finished.put(("load", e.reason))

    def slow_wait():
        from google.longrunning import operations_pb2
        from google.protobuf import duration_pb2

        from google.longrunning import operations_pb2_grpc

        with grpc.insecure_channel(server.target) as ch:
            request = operations_pb2.WaitOperationRequest(name=op.name, timeout=duration_pb2.Duration(seconds=3))
            operations_pb2_grpc.OperationsStub(ch).WaitOperation(request, timeout=10)
            finished.put(("wait", None))

    threads = [threading.Thread(target=slow_load, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=slow_wait) for _ in range(12)]
    try:
        engine_settings_wait = engine.settings.slot_wait_s
        assert engine_settings_wait == 0.2
        object.__setattr__(engine.settings, "slot_wait_s", 3.0)
        for t in threads:
            t.start()
        threading.Event().wait(0.3)
        result = client.generate(prompt=PROMPTS[0], max_new_tokens=2, timeout=10)
        assert result.usage.completion_tokens == 2
        assert finished.qsize() == 0  # every slow call was still waiting when Generate was answered
    finally:
        object.__setattr__(engine.settings, "slot_wait_s", 0.2)
        for uid in held:
            engine.call_on_engine(lambda uid=uid: engine.cache.release(uid)).result()
        for t in threads:
            t.join(20)
        engine.operations.finish(op)
    outcomes = [finished.get_nowait() for _ in range(finished.qsize())]
    assert sorted(kind for kind, _ in outcomes) == ["load"] * 8 + ["wait"] * 12
    assert {reason for kind, reason in outcomes if kind == "load"} <= {"OK", "NO_SLOT_AVAILABLE"}
    for name in [f"slow-{i}" for i in range(8)]:
        client.unload_adapter(name)
    books_balance(engine)


def test_hostile_adapters_and_requests_beside_a_decoding_caller(assets, server, client):
    """While one caller decodes again and again, another sends every hostile adapter and request:
    each is refused with its reason within a bound, and every one of the first caller's outputs
    equals peft's."""
    import time

    from test_hostile_adapters import hostile_corpus

    corpus = hostile_corpus(assets)
    stop = threading.Event()
    victim: list = []

    def decode():
        with lc.Client(server.target, timeout=60) as c:
            while not stop.is_set():
                for adapter in ("qv-r4", "all-r16", ""):
                    chunks = list(c.generate_stream(prompt=PROMPTS[3], adapter_id=adapter, max_new_tokens=24))
                    victim.append((adapter, sum((ch.token_ids for ch in chunks), [])))

    thread = threading.Thread(target=decode)
    thread.start()
    try:
        for name, reason in sorted(corpus.items()):
            started = time.perf_counter()
            error = expect(reason, client.load_adapter, name, source=name)
            assert time.perf_counter() - started < 5 and "/tmp" not in str(error) and "environ" not in str(error)
        expect("PROMPT_TOO_LONG", client.generate, prompt="z" * 5000)
        expect("INVALID_SAMPLING_PARAMETER", client.generate, prompt="x", temperature=1e-30)
        expect("SOURCE_INVALID", client.load_adapter, "x", source="a\0b")
        assert _raw_call(server.target, "/loramux.v1.Loramux/Generate", b"\xff\xff") == (
            grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
        expect("NON_FINITE_LOGITS", client.generate, prompt=PROMPTS[0], adapter_id="overflow", max_new_tokens=4)
    finally:
        stop.set()
        thread.join(60)
    assert len(victim) >= 3
    for adapter, tokens in victim:
        assert tokens == assets.oracle(adapter or None, PROMPTS[3], 24), adapter
    assert {a.adapter_id for a in client.list_adapters()}.isdisjoint(corpus)
    books_balance(server.engine)
