"""Shutdown in order, health that tells the truth, and nothing lost across a SIGKILL."""

import queue
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from google.longrunning import operations_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

import loramux.client as lc
from conftest import PROMPTS
from loramux.server.app import BackgroundServer
from loramux.server.engine.batch import Batch
from test_isolation import engine_paused

N = 8
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def health_of(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def queue_one_then_stop(srv, request: dict, grace: float):
    """With the engine held, queue one Generate and start stopping the server with `grace`.
    Returns (the call's outcome queue, the stopping thread); the engine is held until the
    caller leaves the returned context."""
    outcome: queue.Queue = queue.Queue()

    def call():
        try:
            with lc.Client(srv.target, timeout=30) as c:
                outcome.put(c.generate(**request))
        except lc.LoramuxError as e:
            outcome.put(e)

    threading.Thread(target=call).start()
    wait_for(lambda: srv.engine.stats().waiting == 1, what="the request to queue")
    stopper = threading.Thread(target=lambda: srv.run(srv.running.stop(grace=grace)))
    stopper.start()
    wait_for(lambda: srv.running.servicer.draining, what="draining")
    return outcome, stopper


def test_shutdown_past_grace_cuts_with_shutting_down_after_health_says_not_serving(assets):
    srv = BackgroundServer(assets.settings(adapter_slots=2))
    try:
        with engine_paused(srv.engine):
            outcome, stopper = queue_one_then_stop(srv, dict(prompt=PROMPTS[0], max_new_tokens=200), grace=0.0)
            # The listener is still open: health answers NOT_SERVING, new calls SHUTTING_DOWN.
            wait_for(lambda: health_of(srv.target) == NOT_SERVING, what="NOT_SERVING")
            with lc.Client(srv.target, timeout=10) as c, pytest.raises(lc.LoramuxError) as refused:
                c.generate(prompt="x", max_new_tokens=1)
            assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
        cut = outcome.get(timeout=20)
        assert isinstance(cut, lc.LoramuxError) and cut.reason == "SHUTTING_DOWN", cut
        stopper.join(20)
        assert not stopper.is_alive()
    finally:
        srv.stop()


def test_work_in_flight_finishes_within_the_grace_period(assets):
    srv = BackgroundServer(assets.settings(adapter_slots=2))
    try:
        with engine_paused(srv.engine):
            outcome, stopper = queue_one_then_stop(srv, dict(prompt=PROMPTS[1], max_new_tokens=N), grace=20.0)
        assert outcome.get(timeout=20).token_ids == assets.oracle(None, PROMPTS[1], N)
        stopper.join(20)
        assert not stopper.is_alive()
    finally:
        srv.stop()


def test_health_is_not_serving_while_the_engine_is_stuck_and_recovers(assets, monkeypatch):
    srv = BackgroundServer(assets.settings(adapter_slots=2, engine_stall_s=0.3))
    original = Batch.step
    calls = {"n": 0}

    def slow(self):
        calls["n"] += 1
        if calls["n"] == 1:
            time.sleep(2.5)
        return original(self)

    monkeypatch.setattr(Batch, "step", slow)
    result: queue.Queue = queue.Queue()
    try:
        with lc.Client(srv.target, timeout=30) as c:
            threading.Thread(target=lambda: result.put(c.generate(prompt=PROMPTS[2], max_new_tokens=N))).start()
            wait_for(lambda: health_of(srv.target) == NOT_SERVING, timeout=5, what="NOT_SERVING")
            assert result.get(timeout=20).token_ids == assets.oracle(None, PROMPTS[2], N)
            wait_for(lambda: health_of(srv.target) == SERVING, timeout=5, what="SERVING again")
    finally:
        srv.stop()


# -- a real process: SIGKILL and restart, SIGTERM ------------------------------------------


class Process:
    def __init__(self, assets, state_dir, merge_root, log_path):
        self.log = open(log_path, "a")
        cmd = [sys.executable, "-m", "loramux.cli.main", "serve", "--model", str(assets.base),
               "--adapter-root", str(assets.adapters), "--merge-root", str(merge_root), "--state-dir", str(state_dir),
               "--port", "0", "--max-lora-rank", "16", "--adapter-slots", "3", "--log-level", "INFO", "--auth", "none"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = ""
        end = time.monotonic() + 120
        while "listening on" not in line:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"server did not start: {open(log_path).read()[-3000:]}")
        self.target = line.strip().split()[-1]

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.log.close()
        return code


def test_sigkill_and_restart_bring_back_every_registration_pin_and_operation(assets, tmp_path):
    state, merged, log = tmp_path / "state", tmp_path / "merged", tmp_path / "server.log"
    vanishing = assets.copy_adapter("mlp-r2", "vanishing")
    first = Process(assets, state, merged, log)
    with lc.Client(first.target, timeout=60) as c:
        c.load_adapter("qv", source="qv-r4")
        c.load_adapter("pinned", source="pattern", pin=True)
        c.load_adapter("gone", source="vanishing")
        c.load_adapter("replaced", source="qv-r4")
        c.load_adapter("replaced", source="all-r16", replace=True)
        c.load_adapter("dropped", source="qv-r4")
        c.unload_adapter("dropped")
        merge = c.merge("qv", "out")
        load_thread = threading.Thread(target=lambda: _quietly(c.load_adapter, "late", source="rslora-r8"))
        load_thread.start()
        first.stop(signal.SIGKILL)  # mid-merge or just after it, mid-load or just after it
        load_thread.join(30)
    # What a merge killed mid-write leaves behind, and an adapter whose files vanish meanwhile.
    (merged / "nested").mkdir(parents=True, exist_ok=True)
    (merged / "nested" / ".loramux-merge-tmp-out-abc123").mkdir()
    (merged / "nested" / ".loramux-merge-tmp-out-abc123" / "model.safetensors").write_bytes(b"partial")
    import shutil

    shutil.rmtree(vanishing)

    second = Process(assets, state, merged, log)
    try:
        with lc.Client(second.target, timeout=60) as c:
            listed = {a.adapter_id: a for a in c.list_adapters()}
            assert {"qv", "pinned", "replaced"} <= set(listed) and "gone" not in listed and "dropped" not in listed
            assert set(listed) - {"qv", "pinned", "replaced"} <= {"late"}  # the load in flight: all or nothing
            assert listed["pinned"].pinned and listed["pinned"].tier == "accelerator"
            assert listed["replaced"].rank == 16
            assert c.generate(prompt=PROMPTS[1], adapter_id="replaced", max_new_tokens=N).token_ids == \
                assets.oracle("all-r16", PROMPTS[1], N)
            op = c._operations.GetOperation(operations_pb2.GetOperationRequest(name=merge.name), timeout=10)
            assert op.done
            if op.HasField("error"):
                assert op.error.code == grpc.StatusCode.ABORTED.value[0]
            else:
                assert (merged / "default" / "out" / "loramux_merge.json").is_file()
        assert not [p for p in merged.rglob(".loramux-merge-*")]
        # Not pinned: read (and found gone) by the first call that needed it, the listing, not at start-up.
        assert "adapter 'gone' of tenant 'default' not listed: SOURCE_NOT_FOUND" in log.read_text()
    finally:
        assert second.stop(signal.SIGTERM) == 0


def _quietly(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except lc.LoramuxError:
        pass


def test_sigterm_lets_a_stream_finish_and_exits_zero(assets, tmp_path):
    server = Process(assets, tmp_path / "state", tmp_path / "merged", tmp_path / "server.log")
    with lc.Client(server.target, timeout=60) as c:
        stream = c.generate_stream(prompt=PROMPTS[3], max_new_tokens=60)
        first = next(stream)
        server.proc.send_signal(signal.SIGTERM)
        rest = list(stream)
    assert rest[-1].finish_reason in ("length", "stop_token")
    tokens = first.token_ids + sum((chunk.token_ids for chunk in rest), [])
    assert tokens == assets.oracle(None, PROMPTS[3], 60)[: len(tokens)]
    assert server.proc.wait(30) == 0
    server.log.close()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_serve_prints_only_its_own_lines(assets, tmp_path, log_format):
    """A start-up and shutdown at default flags: every line on stderr is one of loramux's log
    records (as JSON with --log-format json), stdout holds the one announcement; no library's
    warnings, native-library probes, progress bars or teardown reports (torchao, bitsandbytes,
    torch, transformers and Triton are all installed here)."""
    import json
    import re

    err = tmp_path / "stderr"
    cmd = [sys.executable, "-m", "loramux.cli.main", "serve", "--model", str(assets.base), "--port", "0", "--auth", "none",
           "--log-format", log_format, "--http-port", "0"]
    with open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
        announcement = proc.stdout.readline()
        with lc.Client(f"127.0.0.1:{json.loads(announcement)['port'] if log_format == 'json' else announcement.split(':')[-1].strip()}",
                       timeout=60) as c:
            assert len(c.generate(prompt=PROMPTS[0], max_new_tokens=2).token_ids) == 2
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and rest == ""
    lines = err.read_text().splitlines()
    assert lines, "the server logs its start-up"
    if log_format == "json":
        assert json.loads(announcement)["message"].startswith("loramux listening on 127.0.0.1:")
        records = [json.loads(line) for line in lines]  # every line is JSON
        assert all(r["logger"].startswith("loramux") for r in records), lines
    else:
        assert announcement.startswith("loramux listening on 127.0.0.1:")
        own = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) loramux[.\w]*: ")
        assert all(own.match(line) for line in lines), [line for line in lines if not own.match(line)][:5]


def test_a_base_install_without_the_quant_and_s3_extras_serves(assets, tmp_path):
    """torchao, bitsandbytes and s3fs made unimportable, as in an install without the extras:
    the server starts and answers; asking for int8 quantization fails at start-up naming the
    extra to install."""
    absent = ("import sys\nfor name in ('torchao', 'bitsandbytes', 's3fs'):\n    sys.modules[name] = None\n"
              "from loramux.cli.main import main\nsys.exit(main(sys.argv[1:]))\n")
    cmd = [sys.executable, "-c", absent, "serve", "--model", str(assets.base), "--port", "0", "--auth", "none"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("loramux listening on"), proc.stderr.read()[-2000:] if not line else line
        with lc.Client(line.strip().split()[-1], timeout=60) as c:
            assert c.generate(prompt=PROMPTS[0], max_new_tokens=3).token_ids == assets.oracle(None, PROMPTS[0], 3)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    refused = subprocess.run([*cmd, "--quantization", "int8"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == ("error: --quantization: 'int8' needs torchao, which is not "
                                                       "installed: install the quant extra: pip install 'loramux[quant]'")
