"""--engine-process: the engine in a process of its own, the front doors in the server's.

A real server on loopback whose engine is a spawned process: every facade method crosses
the pipe (generation through both doors, errors with their reasons, cancellation, adapters,
merges and their operations, tokenizing), the engine's metrics are served by the front
doors' Prometheus endpoint, its spans join the caller's trace, and an engine that dies
fails only what waited on it and turns readiness off. Through the CLI: SIGTERM drains and
ends both processes, and an engine whose server is killed ends too."""

from __future__ import annotations

import contextlib
import inspect
import os
import pickle
import signal
import subprocess
import sys
import threading
import urllib.request
from concurrent import futures

import grpc
import httpx2 as httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

import loramux.client as lc
from conftest import ADAPTERS, PROMPTS, eventually, loaded_client, scrape
from loramux.server import errors
from loramux.server.app import BackgroundServer
from loramux.server.engine.facade import Facade
from loramux.server.engine_process.client import RemoteFacade

N = 8
SERVICE = "/loramux.v1.Loramux/"


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.spans = []  # (service.name, span)

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            attrs = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                self.spans += [(attrs.get("service.name"), span) for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def receiver():
    receiver = _Receiver()
    collector = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, collector)
    receiver.port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    yield receiver
    collector.stop(0)


@pytest.fixture(scope="module")
def server(assets, tmp_path_factory, receiver):
    settings = assets.settings(engine_process=True, adapter_slots=3, http_port=0, metrics_port=0, batch_window_ms=5,
                               merge_root=tmp_path_factory.mktemp("merged"), traces_exporters=("otlp",),
                               otlp_protocol="grpc", otlp_endpoint=f"http://127.0.0.1:{receiver.port}",
                               service_name="loramux-split")
    with BackgroundServer(settings) as srv:
        srv.base_url = f"http://127.0.0.1:{srv.running.http_port}/v1"
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with loaded_client(server.target) as c:
        yield c


def test_the_remote_facade_answers_every_method_of_the_facade():
    def public(cls):
        return {name for name, _ in inspect.getmembers(cls) if not name.startswith("_")}

    instance = {"telemetry", "model", "public_model", "started", "special_token_ids"}  # attributes set in __init__
    assert public(RemoteFacade) | instance == public(Facade) | instance
    for name in public(Facade) - {"special_token_ids"}:
        theirs, ours = inspect.signature(getattr(Facade, name)), inspect.signature(getattr(RemoteFacade, name))
        assert list(theirs.parameters) == list(ours.parameters), name


def test_every_domain_error_crosses_a_process_whole():
    found = [cls for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.LoramuxError) and cls is not errors.LoramuxError]
    assert len(found) > 30
    for cls in found:
        error = (cls("abc") if cls is errors.InternalError else
                 cls("it failed", field="adapter_id", retry_after_s=2.5, slots=3))
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is cls
        assert (copy.kind, copy.reason, copy.message, copy.field, copy.retry_after_s, copy.metadata, copy.args) == (
            error.kind, error.reason, error.message, error.field, error.retry_after_s, error.metadata, error.args)
    reasoned = pickle.loads(pickle.dumps(errors.InvalidRequest("bad", field="top_k", reason="TOP_K_INVALID")))
    assert reasoned.reason == "TOP_K_INVALID" and errors.InvalidRequest.reason != "TOP_K_INVALID"


def test_generate_equals_peft_through_the_engine_process(assets, server, client):
    assert server.engine.pid != os.getpid() and server.engine.healthy()
    for adapter in ["", *ADAPTERS]:
        result = client.generate(prompt=PROMPTS[1], adapter_id=adapter, max_new_tokens=N, return_logprobs=True)
        assert result.token_ids == assets.oracle(adapter or None, PROMPTS[1], N), adapter
        assert len(result.logprobs) == len(result.token_ids)
        chunks = list(client.generate_stream(prompt=PROMPTS[1], adapter_id=adapter, max_new_tokens=N))
        assert sum((c.token_ids for c in chunks), []) == result.token_ids
        assert "".join(c.text for c in chunks) == result.text
    tokens = client.tokenize(prompt=PROMPTS[3])
    assert tokens.token_ids == assets.tokenizer(PROMPTS[3])["input_ids"]
    info = client.server_info()
    assert (info.engine_process, info.adapter_slots, info.lora_kernel) == (True, 3, "torch")


def test_mixed_concurrent_requests_and_n_completions_equal_peft(assets, server, client):
    jobs = [(a, p) for p in PROMPTS for a in ["", *ADAPTERS]]
    with futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: client.generate(prompt=job[1], adapter_id=job[0], max_new_tokens=N), jobs))
    for (adapter, prompt), result in zip(jobs, results):
        assert result.token_ids == assets.oracle(adapter or None, prompt, N), (adapter, prompt)
    with openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=60) as oai:
        answer = oai.completions.create(model="all-r16", prompt=PROMPTS[0], max_tokens=N, n=3, temperature=0)
        expected = assets.tokenizer.decode(assets.oracle("all-r16", PROMPTS[0], N), skip_special_tokens=True)
        assert [c.text for c in answer.choices] == [expected] * 3
        logprobs = oai.completions.create(model="qv-r4", prompt=PROMPTS[2], max_tokens=N, temperature=0, logprobs=2)
        ids = assets.oracle("qv-r4", PROMPTS[2], N)
        assert logprobs.choices[0].logprobs.tokens == [assets.tokenizer.decode([i]) for i in ids]  # texts made here
        date = oai.completions.create(model="all-r16", prompt="fox", max_tokens=16, temperature=0.8, seed=3,
                                      extra_body={"guided_regex": "[0-9]{4}-[0-9]{2}"})  # compiled in the engine's process
        assert len(date.choices[0].text) == 7 and date.choices[0].text[4] == "-"
        assert {"all-r16", "qv-r4", *ADAPTERS} <= {m.id for m in oai.models.list().data}


def test_errors_keep_their_codes_and_reasons(server, client):
    with pytest.raises(lc.NotFound) as e:
        client.generate(prompt="fox", adapter_id="nope", max_new_tokens=N)
    assert e.value.reason == "ADAPTER_NOT_FOUND"
    with pytest.raises(lc.InvalidArgument) as e:
        client.generate(prompt="fox", max_new_tokens=N, temperature=-1)
    assert [f for f, _ in e.value.field_violations] == ["temperature"]
    with pytest.raises(lc.InvalidArgument) as e:
        client.load_adapter("evil", source="../outside")
    assert e.value.reason == "SOURCE_OUTSIDE_ROOT"
    with openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=60) as oai:
        with pytest.raises(openai.NotFoundError) as e:
            oai.completions.create(model="nope", prompt="fox", max_tokens=2)
        assert (e.value.body["code"], e.value.body["param"]) == ("model_not_found", "model")


def test_a_closed_stream_frees_its_row_in_the_engine(server, client):
    stream = client.generate_stream(prompt="fox", adapter_id="qv-r4", max_new_tokens=4000, ignore_eos=True)
    assert next(stream).token_ids
    eventually(lambda: scrape(server.telemetry.metrics_port)[("loramux_batch_size", ())] == 1)  # the engine's gauge, read through the front doors
    stream.close()
    eventually(lambda: scrape(server.telemetry.metrics_port)[("loramux_batch_size", ())] == 0)
    assert client.generate(prompt="fox", max_new_tokens=1).usage.completion_tokens == 1


def test_adapters_and_a_merge_through_the_engine_process(server, client):
    info = client.load_adapter("pinned-copy", source="mlp-r2", pin=True)
    assert (info.adapter_id, info.rank, info.pinned, info.tier) == ("pinned-copy", 2, True, "accelerator")
    assert client.get_adapter("pinned-copy").pinned
    assert "pinned-copy" in {a.adapter_id for a in client.list_adapters()}
    client.unload_adapter("pinned-copy")
    with pytest.raises(lc.NotFound):
        client.get_adapter("pinned-copy")
    handle = client.merge("qv-r4", "merged-qv")
    result = handle.result(timeout=120)  # WaitOperation: the engine's process calls back when the merge ends
    assert result.merged_tensors > 0
    assert handle.name in {op.operation for op in client.list_operations()}
    assert client.operation(handle.name).progress().done
    handle.delete()
    with pytest.raises(lc.NotFound):
        client.operation(handle.name).progress()


def test_the_engines_series_are_served_with_the_front_doors(server, client):
    before = scrape(server.telemetry.metrics_port)
    result = client.generate(prompt=PROMPTS[0], adapter_id="pattern", max_new_tokens=N)
    after = scrape(server.telemetry.metrics_port)
    tenant = (("tenant", "default"),)
    ok = (("rpc_grpc_status_code", "OK"), ("rpc_method", "Generate"))
    grown = lambda key: after[key] - before.get(key, 0)  # noqa: E731
    assert grown(("loramux_generate_tokens_total", tenant)) == len(result.token_ids)  # the engine's
    assert grown(("loramux_rpc_requests_total", ok)) == 1  # the front doors'
    assert grown(("vllm:generation_tokens_total", ())) == len(result.token_ids)  # vLLM's name, made from it
    assert grown(("vllm:e2e_request_latency_seconds_count", (("model_name", "pattern"),))) == 1
    assert after[("loramux_engine_process_resident_memory_bytes", ())] > 0
    assert after[("process_resident_memory_bytes", ())] > 0
    # One exposition for both processes: no family twice (target_info is the front doors' alone).
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.telemetry.metrics_port}/metrics", timeout=10).read().decode()
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(names) == len(set(names)) and "target_info" in names


def test_engine_spans_are_children_of_the_calls_span(server, client, receiver):
    result = client.generate(prompt=PROMPTS[2], adapter_id="qv-r4", max_new_tokens=3)
    assert result.token_ids

    def exported():
        calls = [s for _, s in receiver.spans if s.name == SERVICE + "Generate" and s.kind == s.SPAN_KIND_SERVER]
        assert calls
        call = calls[-1]
        inside = {s.name: s for _, s in receiver.spans if s.trace_id == call.trace_id and s.name.startswith("loramux.")}
        assert {"loramux.queue", "loramux.prefill", "loramux.decode"} <= set(inside)
        return call, inside

    call, inside = eventually(exported, within=30)
    for name in ("loramux.queue", "loramux.prefill", "loramux.decode"):
        assert inside[name].parent_span_id == call.span_id, name


def test_a_failed_start_raises_its_error_and_leaves_no_process(assets, tmp_path):
    (tmp_path / "empty").mkdir()  # a directory without a checkpoint: loading it fails in the engine's process
    settings = assets.settings(engine_process=True, model=str(tmp_path / "empty"))
    children = _children(os.getpid())
    with pytest.raises(errors.InternalError) as e:
        BackgroundServer(settings)
    assert e.value.reason == "INTERNAL" and e.value.metadata["correlation_id"]
    assert _children(os.getpid()) <= children


@contextlib.contextmanager
def _shut(telemetry):
    try:
        yield
    finally:
        telemetry.shutdown()


def test_an_engine_that_dies_fails_what_waited_and_readiness(assets):
    """(With telemetry the caller built, as tests and benchmarks give it: the engine's series
    are served with it too.)"""
    from loramux.server.telemetry.providers import build_telemetry

    settings = assets.settings(engine_process=True, http_port=0, batch_window_ms=5, metrics_port=0)
    telemetry = build_telemetry(settings)
    with _shut(telemetry), BackgroundServer(settings, telemetry=telemetry) as server, \
            lc.Client(server.target, timeout=60) as client:
        stream = client.generate_stream(prompt="fox", max_new_tokens=4000, ignore_eos=True)
        assert next(stream).token_ids
        assert scrape(telemetry.metrics_port)[("loramux_batch_size", ())] == 1  # the engine's gauge
        os.kill(server.engine.pid, signal.SIGKILL)
        with pytest.raises(lc.Unavailable) as e:
            for _ in stream:
                pass
        assert e.value.reason == "ENGINE_EXITED"
        with pytest.raises(lc.Unavailable) as e:
            client.generate(prompt="fox", max_new_tokens=2)
        assert e.value.reason == "ENGINE_EXITED"
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            eventually(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                       == health_pb2.HealthCheckResponse.NOT_SERVING)
        base = f"http://127.0.0.1:{server.running.http_port}"
        assert httpx.get(base + "/ready").status_code == 503


def test_with_a_shared_store_an_adapter_seen_is_not_read_again(assets, tmp_path):
    settings = assets.settings(engine_process=True, state_dir=tmp_path / "state")
    with BackgroundServer(settings) as server, lc.Client(server.target, timeout=60) as client:
        facade = server.engine.facade
        assert facade.must_read("default", "qv-r4")  # unknown here: resolve (on the adapter pool) reads it first
        client.load_adapter("qv-r4", source="qv-r4")
        assert not facade.must_read("default", "qv-r4") and not facade.must_read("default", "")
        client.unload_adapter("qv-r4")
        assert facade.must_read("default", "qv-r4")
        with pytest.raises(lc.NotFound):
            client.generate(prompt="fox", adapter_id="qv-r4", max_new_tokens=2)
        assert facade.must_read("default", "qv-r4")


def test_the_engines_tenancy_reads_the_keys_file(assets, tmp_path):
    """Quotas and metric labels are the engine's (its own Authenticator over the same keys
    file): a tenant's adapter quota is enforced there, with its QuotaFailure, and another
    tenant is not limited."""
    from loramux.server.tenancy.keys import append_key

    keys_file = tmp_path / "keys.yaml"
    keys = {t: append_key(keys_file, t, "admin", t) for t in ("limited", "free")}
    keys_file.write_text(keys_file.read_text() + "tenants:\n  limited:\n    quotas: {adapters: 1}\n")
    settings = assets.settings(engine_process=True, auth="keys", auth_keys_file=keys_file)
    with (BackgroundServer(settings) as server, lc.Client(server.target, api_key=keys["limited"]) as limited,
          lc.Client(server.target, api_key=keys["free"]) as free):
        limited.load_adapter("one", source="qv-r4")
        with pytest.raises(lc.ResourceExhausted) as e:
            limited.load_adapter("two", source="mlp-r2")
        assert (e.value.reason, e.value.metadata["quota"], e.value.metadata["tenant"]) == ("QUOTA_EXCEEDED", "adapters",
                                                                                           "limited")
        assert e.value.quota_violations[0][0] == "tenant:limited"
        for name in ("a", "b"):
            free.load_adapter(name, source="qv-r4")
        assert [a.adapter_id for a in free.list_adapters()] == ["a", "b"]
        with pytest.raises(lc.NotFound):  # another tenant's adapter is not there for this caller
            free.generate(prompt="fox", adapter_id="one", max_new_tokens=2)


def test_an_interrupted_start_leaves_no_process(assets):
    from loramux.server.engine_process.client import EngineProcess
    from loramux.server.telemetry.signals import Telemetry

    process = EngineProcess(assets.settings(engine_process=True))
    before = _children(os.getpid())
    failed = []

    def start():
        try:
            process.start(Telemetry())
        except errors.InternalError as e:
            failed.append(e)

    starting = threading.Thread(target=start)
    starting.start()
    eventually(lambda: process._process is not None and process._process.pid is not None)
    process.abort()  # as serve() does when Ctrl-C interrupts the start
    starting.join(60)
    assert len(failed) == 1 and not starting.is_alive()
    assert process._process.exitcode is not None and _children(os.getpid()) <= before


def test_a_server_that_cannot_listen_stops_its_engine_process(assets):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        before = _children(os.getpid())
        with pytest.raises(errors.InvalidSettings):
            BackgroundServer(assets.settings(engine_process=True), port=taken.getsockname()[1])
        eventually(lambda: _children(os.getpid()) <= before)


def _half_writer(conn, pid_file: str) -> None:
    """A stand-in engine that ends in the middle of writing a message, while a process it
    forked still holds its end of the pipe."""
    import struct

    child = os.fork()
    if child == 0:
        signal.pause()  # holds the pipe until the test kills it
        os._exit(0)
    with open(pid_file, "w") as f:
        f.write(str(child))
    os.write(conn.fileno(), struct.pack("!i", 1 << 20) + b"half")  # a frame of 1 MiB, 4 bytes of it
    os._exit(0)


def test_an_engine_that_ends_mid_message_fails_what_waited(assets, tmp_path):
    import multiprocessing

    from loramux.server.engine_process.client import EngineProcess

    engine = EngineProcess(assets.settings(engine_process=True))
    context = multiprocessing.get_context("spawn")
    here, there = context.Pipe(duplex=True)
    pid_file = tmp_path / "holder.pid"
    engine._process = context.Process(target=_half_writer, args=(there, str(pid_file)))
    engine._conn = here
    got: list = []
    (gid,) = engine.new_ids([got.append])
    lost: list = []
    engine.on_lost = lambda: lost.append(True)
    engine._process.start()
    there.close()
    engine._start_reading()
    try:
        engine._reader.join(30)  # the process ended; the held pipe and the half message do not stop the reader
        assert not engine._reader.is_alive() and lost == [True]
        assert [type(e).__name__ for e in got] == ["ErrorEvent"] and got[0].error.reason == "ENGINE_EXITED"
        with pytest.raises(errors.EngineExited):
            engine.call("stats")
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        here.close()


def _children(pid: int) -> set[int]:
    found = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found |= {int(p) for p in f.read().split()}
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return found


def _engine_of(pid: int) -> int:
    """The server's engine process (multiprocessing also starts its resource tracker)."""
    found = []
    for child in _children(pid):
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                found.append(child)
    (engine,) = found
    return engine


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _serve(assets, tmp_path, *extra) -> subprocess.Popen:
    args = [sys.executable, "-m", "loramux.cli.main", "serve", "--model", str(assets.base), "--adapter-root",
            str(assets.adapters), "--auth", "none", "--port", "0", "--engine-process", *extra]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    line = process.stdout.readline()
    assert line.startswith("loramux listening on"), (line, process.stderr.read() if process.poll() is not None else "")
    return process


def test_sigterm_drains_and_ends_both_processes(assets, tmp_path):
    process = _serve(assets, tmp_path)
    engine = _engine_of(process.pid)
    assert _alive(engine)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, process.stderr.read()
    eventually(lambda: not _alive(engine))


def test_a_server_whose_engine_dies_exits_with_1(assets, tmp_path):
    process = _serve(assets, tmp_path)
    os.kill(_engine_of(process.pid), signal.SIGKILL)
    assert process.wait(60) == 1
    assert "the engine process ended: the server stops" in process.stderr.read()


def test_an_engine_whose_server_is_killed_ends_too(assets, tmp_path):
    process = _serve(assets, tmp_path)
    engine = _engine_of(process.pid)
    process.kill()
    process.wait(10)
    eventually(lambda: not _alive(engine), within=60)
