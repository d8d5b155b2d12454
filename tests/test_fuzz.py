"""Every RPC fuzzed against a running server (well-formed and malformed bodies), and churn of
every adapter operation at once: no INTERNAL, no UNKNOWN, the books balance afterwards, and good
requests still equal the peft oracle.

The suite runs a small version; `make fuzz` runs thousands of requests and a longer churn
(LORAMUX_FUZZ_EXAMPLES, LORAMUX_CHURN_S)."""

import os
import random
import threading
import time

import grpc
import pytest
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2
from hypothesis import HealthCheck, given, settings, strategies as st

import loramux.client as lc
from conftest import ADAPTERS, PROMPTS, loaded_client
from loramux.server.app import BackgroundServer
from loramux.v1 import adapter_pb2, generation_pb2, loramux_service_pb2
from test_isolation import books_balance

EXAMPLES = int(os.environ.get("LORAMUX_FUZZ_EXAMPLES", "150"))
CHURN_S = float(os.environ.get("LORAMUX_CHURN_S", "6"))
N = 6
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@pytest.fixture(scope="module")
def server(assets, tmp_path_factory):
    settings = assets.settings(
        adapter_slots=3, merge_root=tmp_path_factory.mktemp("merged"), batch_window_ms=5, hub_offline=True,
        hub_cache_dir=tmp_path_factory.mktemp("hub"), max_prompt_bytes=2048, slot_wait_s=0.2, max_queue=64,
    )
    srv = BackgroundServer(settings)
    with loaded_client(srv.target):
        pass
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
ids = st.one_of(st.sampled_from(["", "qv-r4", "all-r16", "nope", "a" * 200, "../x", "x\0y"]), text)
sources = st.one_of(st.sampled_from([*ADAPTERS, "../..", "/etc", "hf://org/repo", "hf://", "qv-r4/../pattern", "a\0b"]), text)
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
int32 = st.integers(-(2**31), 2**31 - 1)

generate_requests = st.builds(
    generation_pb2.GenerateRequest,
    adapter_id=ids,
    prompt=st.one_of(st.just(""), st.sampled_from(PROMPTS), text),
    prompt_token_ids=st.lists(st.integers(-5, 1000), max_size=20),
    messages=st.lists(st.builds(generation_pb2.ChatMessage, role=st.sampled_from(["", "user", "system"]) | text, content=text), max_size=3),
    max_new_tokens=st.one_of(st.integers(-3, N), int32),
    temperature=floats,
    top_p=floats,
    top_k=int32,
    repetition_penalty=floats,
    seed=st.integers(0, 2**64 - 1),
    stop=st.lists(text, max_size=3),
    stop_token_ids=st.lists(int32, max_size=5),
    return_logprobs=st.booleans(),
    presence_penalty=floats,
    frequency_penalty=floats,
    min_p=floats,
    logit_bias=st.dictionaries(st.integers(-5, 1000), floats, max_size=4),
    min_tokens=st.one_of(st.integers(-3, N), int32),
    top_logprobs=st.integers(-3, 25),
    tools_json=st.one_of(st.just(""), text, st.just('[{"type": "function", "function": {"name": "f"}}]')),
    chat_template_kwargs_json=st.one_of(st.just(""), text, st.just('{"enable_thinking": false}'), st.just('{"tools": 1}')),
    structured_output=st.one_of(
        st.none(),
        st.builds(generation_pb2.StructuredOutput, json_object=st.booleans()),
        st.builds(generation_pb2.StructuredOutput, json_schema=st.one_of(text, st.sampled_from(
            ['{"type": "object"}', '{"type": "objectx"}', '{"$ref": "#"}', '[', '{"enum": []}']))),
        st.builds(generation_pb2.StructuredOutput, regex=st.one_of(text, st.just("(a|aa){0,500}b"))),
        st.builds(generation_pb2.StructuredOutput, grammar=st.one_of(text, st.just('start: "x" start | "y"'))),
        st.builds(generation_pb2.StructuredOutput, choice=st.builds(generation_pb2.Choices, choices=st.lists(text, max_size=3))),
    ),
)
REQUESTS = {
    "/loramux.v1.Loramux/Generate": generate_requests,
    "/loramux.v1.Loramux/LoadAdapter": st.builds(
        adapter_pb2.LoadAdapterRequest, adapter_id=ids, source=sources, revision=text,
        pin=st.booleans(), warm=st.booleans(), replace=st.booleans(),
    ),
    "/loramux.v1.Loramux/UnloadAdapter": st.builds(adapter_pb2.UnloadAdapterRequest, adapter_id=ids),
    "/loramux.v1.Loramux/GetAdapter": st.builds(adapter_pb2.GetAdapterRequest, adapter_id=ids),
    "/loramux.v1.Loramux/ListAdapters": st.builds(adapter_pb2.ListAdaptersRequest, page_size=int32, page_token=text),
    "/loramux.v1.Loramux/Merge": st.builds(
        loramux_service_pb2.MergeRequest, adapter_id=ids, output_dir=st.one_of(text, st.sampled_from(["m", "../m", "a/b"])),
        overwrite=st.booleans(),
    ),
    "/loramux.v1.Loramux/GetServerInfo": st.just(loramux_service_pb2.GetServerInfoRequest()),
    "/loramux.v1.Loramux/Tokenize": st.builds(
        generation_pb2.TokenizeRequest, prompt=st.one_of(st.just(""), text),
        messages=st.lists(st.builds(generation_pb2.ChatMessage, role=text, content=text, extra_json=text), max_size=3),
        tools_json=text, chat_template_kwargs_json=text,
    ),
    "/google.longrunning.Operations/GetOperation": st.builds(operations_pb2.GetOperationRequest, name=text),
    "/google.longrunning.Operations/ListOperations": st.builds(
        operations_pb2.ListOperationsRequest, name=text, page_size=int32, page_token=text, filter=text
    ),
    "/google.longrunning.Operations/WaitOperation": st.builds(
        operations_pb2.WaitOperationRequest, name=text,
        timeout=st.builds(duration_pb2.Duration, seconds=st.integers(-5, 5)),
    ),
}
calls = st.one_of(
    st.tuples(st.sampled_from(sorted(REQUESTS)), st.just(False)).flatmap(
        lambda t: st.tuples(st.just(t[0]), REQUESTS[t[0]].map(lambda m: m.SerializeToString()))
    ),
    st.tuples(st.sampled_from(sorted(REQUESTS) + ["/loramux.v1.Loramux/GenerateStream"]), st.binary(max_size=64)),
)


def _call(channel, method: str, body: bytes) -> grpc.StatusCode:
    try:
        if method.endswith("GenerateStream"):
            for _ in channel.unary_stream(method)(body, timeout=5):
                pass
        else:
            channel.unary_unary(method)(body, timeout=5)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(call=calls)
def test_fuzz_every_rpc(channel, call):
    method, body = call
    code = _call(channel, method, body)
    assert code not in FORBIDDEN, (method, body[:200])


def test_after_fuzzing_good_requests_still_equal_peft(assets, server):
    wait_idle(server.engine)
    with lc.Client(server.target, timeout=60) as c:
        for name in ADAPTERS:
            c.load_adapter(f"check-{name}", source=name, replace=True)
            result = c.generate(prompt=PROMPTS[1], adapter_id=f"check-{name}", max_new_tokens=N)
            assert result.token_ids == assets.oracle(name, PROMPTS[1], N)
    books_balance(server.engine)


def wait_idle(engine, timeout: float = 30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        stats = engine.stats()
        if not stats.waiting and not stats.running and not engine.operations.running():
            return
        time.sleep(0.05)
    pytest.fail("the engine did not go idle")


def test_churn_of_every_adapter_operation_balances_the_books(assets, server):
    names = ["c0", "c1", "c2", "c3"]
    sources = list(ADAPTERS)
    stop = time.monotonic() + CHURN_S
    seen: dict[str, int] = {}
    bad: list[str] = []
    lock = threading.Lock()

    def record(outcome: str) -> None:
        with lock:
            seen[outcome] = seen.get(outcome, 0) + 1

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with lc.Client(server.target, timeout=20) as c:
            while time.monotonic() < stop:
                name = rng.choice(names)
                action = rng.choice(["load", "replace", "unload", "pin", "warm", "generate", "stream", "cancel"])
                try:
                    if action in ("load", "replace", "pin", "warm"):
                        c.load_adapter(name, source=rng.choice(sources), replace=action == "replace" or rng.random() < 0.3,
                                       pin=action == "pin", warm=action == "warm")
                    elif action == "unload":
                        c.unload_adapter(name)
                    elif action == "generate":
                        c.generate(prompt=rng.choice(PROMPTS), adapter_id=name, max_new_tokens=rng.randint(1, N))
                    else:
                        stream = c.generate_stream(prompt=rng.choice(PROMPTS), adapter_id=name, max_new_tokens=20)
                        for i, _ in enumerate(stream):
                            if action == "cancel" and i == 1:
                                stream.close()
                                break
                    record(f"{action}:OK")
                except lc.LoramuxError as e:
                    record(f"{action}:{e.reason}")
                    if e.code in FORBIDDEN:
                        bad.append(f"{action}: {e}")
                except grpc.RpcError as e:  # a cancelled stream
                    record(f"{action}:{e.code().name}")
                    if e.code() in FORBIDDEN:
                        bad.append(f"{action}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CHURN_S + 60)
    assert not bad, bad
    assert seen.get("generate:OK", 0) + seen.get("stream:OK", 0) > 0 and seen.get("unload:OK", 0) > 0, seen
    wait_idle(server.engine)
    books_balance(server.engine)
    snapshot = server.engine.cache.snapshot()
    assert snapshot.in_use == {}
    assert snapshot.pinned == {r.uid for r in server.engine.registry.list("default") if r.pinned}
    with lc.Client(server.target, timeout=60) as c:  # still serving, still exact
        for name in names:
            c.load_adapter(name, source="pattern", replace=True)
            assert c.generate(prompt=PROMPTS[0], adapter_id=name, max_new_tokens=N).token_ids == assets.oracle("pattern", PROMPTS[0], N)
