"""Fault injection for the shared store: every folder of `--state-dir`, and the object-storage
registry (moto's S3 server on loopback), holds hostile files (malformed, partial, oversized,
of the wrong JSON type or fields, misplaced under another tenant's folder, special files: a
FIFO, a symbolic link, a directory named like a record) beside real ones. Replicas start and
restart over them: each starts, serves, reports exactly what it skipped, and follows what the
others register, within the sync interval plus one read, on both stores, also after it
registered names of its own.

`make fuzz` runs the same test with many more random hostile files and restarts
(LORAMUX_STORE_FAULTS, LORAMUX_STORE_RESTARTS)."""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc

import loramux.client as lc
from conftest import PROMPTS
from loramux.server.app import BackgroundServer
from loramux.server.store.state import MAX_OPERATION_BYTES, MAX_REGISTRATION_BYTES, SavedAdapter
from test_shared_store import BUCKET, N, _equal, eventually, s3  # noqa: F401 (the S3 fixture)

SYNC_S = 0.2
RANDOM_FAULTS = int(os.environ.get("LORAMUX_STORE_FAULTS", "24"))
RESTARTS = int(os.environ.get("LORAMUX_STORE_RESTARTS", "1"))
HEX = "0123456789abcdef"


def _op_name(rng: random.Random) -> str:
    return "merge-" + "".join(rng.choice(HEX) for _ in range(32))


def _registration(tenant: str, adapter_id: str, **changes) -> dict:
    body = {"tenant": tenant, "adapter_id": adapter_id, "source": "qv-r4", "revision": "r", "pinned": False,
            "load_time": 1.0, "generation": uuid.uuid4().hex}
    body.update(changes)
    return body


def _operation(name: str, tenant: str, owner: str = "replica-gone", **body_changes) -> dict:
    now = time.time()  # within the retention: a record past it is removed unread
    body = {"metadata": {"adapter_id": "x"}, "create_time": now - 2, "done": True, "end_time": now - 1}
    body.update(body_changes)
    return {"name": f"operations/{name}", "tenant": tenant, "owner": owner, "body": body}


def _dumps(value) -> bytes:
    return json.dumps(value).encode()


def registration_faults(rng: random.Random) -> dict[str, bytes]:
    """Hostile registration records by their place under `adapters/` (`<tenant>/<id>.json`):
    each must be skipped, none may stop a replica or reach another tenant."""
    faults = {
        "default/broken.json": b"{oops",
        "default/a-list.json": b"[1, 2, 3]",
        "default/no-fields.json": b"{}",
        "default/empty.json": b"",
        "default/binary.json": bytes(range(256)),
        "default/wrong-types.json": _dumps(_registration("default", "wrong-types", pinned="yes")),
        "default/nan-time.json": b'{"tenant": "default", "adapter_id": "nan-time", "source": "s", "revision": "r", '
                                 b'"pinned": false, "load_time": NaN}',
        "default/elsewhere.json": _dumps(_registration("default", "another-name")),  # names another id
        "default/deep.json": b"[" * 100_000 + b"]" * 100_000,
        "team-a/stolen.json": _dumps(_registration("default", "stolen")),  # under team-a's folder, naming default
        "default/oversized.json": _dumps(_registration("default", "oversized", source="x" * (MAX_REGISTRATION_BYTES + 1))),
        "default/huge-number.json": _dumps(_registration("default", "huge-number", load_time=10 ** 400)),
    }
    for i in range(RANDOM_FAULTS):
        body = bytearray(_dumps(_registration("default", f"random-{i}")))
        for _ in range(rng.randint(1, 4)):  # a few bytes changed, cut, or doubled
            at = rng.randrange(len(body))
            choice = rng.random()
            if choice < 0.4:
                body[at] = rng.randrange(256)
            elif choice < 0.7:
                del body[at:]
                body += b"," if not body else b""
            else:
                body[at:at] = body[at:at + rng.randint(1, 20)]
        # Mutations that still parse as this very registration are not faults: keep them out.
        try:
            if json.loads(bytes(body)).get("adapter_id") == f"random-{i}" and json.loads(bytes(body)) == json.loads(
                    _dumps(_registration("default", f"random-{i}", generation=json.loads(bytes(body)).get("generation")))):
                continue
        except (ValueError, AttributeError, UnicodeDecodeError, TypeError):
            pass
        faults[f"default/random-{i}.json"] = bytes(body)
    return faults


def write_state_faults(state: Path, rng: random.Random) -> tuple[set[str], str, list[str]]:
    """Hostile files in every folder of a state directory; returns the places the replicas
    must report as skipped (relative to the state directory), the one real operation's name,
    and the hostile operations' names."""
    expected = set()
    for place, data in registration_faults(rng).items():
        path = state / "adapters" / place
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if not _parses_as(data, place):
            expected.add(f"adapters/{place}")
    special = state / "adapters" / "default"
    os.mkfifo(special / "fifo.json")
    (special / "link.json").symlink_to("/etc/hostname")
    (special / "a-directory.json").mkdir()
    (special / ".tmp-123-partial.json").write_bytes(b'{"tenant": "def')  # a writer that died: never read
    expected |= {"adapters/default/fifo.json", "adapters/default/link.json", "adapters/default/a-directory.json"}

    ops = state / "operations"
    names = [_op_name(rng) for _ in range(15)]
    records = {
        f"default/{names[0]}.json": b"{oops",
        f"default/{names[1]}.json": b"[]",
        f"default/{names[2]}.json": _dumps({k: v for k, v in _operation(names[2], "default").items() if k != "body"}),
        f"default/{names[3]}.json": _dumps(_operation(names[3], "default", create_time="yesterday")),
        f"default/{names[4]}.json": _dumps(_operation(names[9], "default")),  # names another operation
        f"team-a/{names[5]}.json": _dumps(_operation(names[5], "default")),  # in team-a's folder, naming default
        f"default/{names[6]}.json": _dumps(_operation(names[6], "default", error={"kind": "nonsense", "reason": "X",
                                                                                   "message": "m", "field": None})),
        f"default/{names[7]}.json": _dumps(_operation(names[7], "default", result={"files": "not a list"})),
        f"default/{names[8]}.json": _dumps(_operation(names[8], "default", metadata={"pad": "x" * MAX_OPERATION_BYTES})),
        f"default/{names[12]}.json": _dumps(_operation(names[12], "default", create_time=10 ** 400)),
        f"default/{names[13]}.json": _dumps(_operation(names[13], "default", error={
            "kind": "internal", "reason": "X", "message": "m", "field": None, "metadata": {"self": 1}})),  # a valid error
        f"default/{names[14]}.json": _dumps(_operation(names[14], "default", metadata={"tensors_done": "many"})),
        "default/not-an-operation.json": _dumps(_operation(names[10], "default")),
        f"operations_{names[11]}.json": b"{oops",  # the flat layout of earlier versions
    }
    for place, data in records.items():
        (ops / place).parent.mkdir(parents=True, exist_ok=True)
        (ops / place).write_bytes(data)
        expected.add(f"operations/{place}")
    os.mkfifo(ops / "default" / f"{_op_name(rng)}.json")
    expected.add(next(f"operations/default/{p.name}" for p in (ops / "default").iterdir() if p.is_fifo()))
    # A running operation of a replica whose heartbeat is a FIFO: ended as interrupted, the heartbeat reported.
    running = _op_name(rng)
    (ops / "default" / f"{running}.json").write_bytes(_dumps(_operation(running, "default", owner="replica-fifo",
                                                                        done=False, end_time=None)))
    (state / "replicas").mkdir(parents=True, exist_ok=True)
    os.mkfifo(state / "replicas" / "replica-fifo.json")
    expected.add("replicas/replica-fifo.json")
    (state / "junk.bin").write_bytes(os.urandom(64))
    # A tenant folder that is a link to elsewhere: never read through, and replaced when written.
    elsewhere = state.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / f"{_op_name(rng)}.json").write_bytes(_dumps(_operation(_op_name(rng), "linked")))
    (ops / "linked").symlink_to(elsewhere)
    (state / "adapters" / "linked").symlink_to(elsewhere)
    expected.discard(f"operations/default/{names[13]}.json")  # a record whose error carries odd metadata keys is fine
    return expected, running, [f"operations/{n}" for n in names[:9] + names[12:13] + names[14:15]]


def _op_files(state: Path) -> list[str]:
    """The operation names of the regular files under operations/default/."""
    return [f"operations/{p.stem}" for p in (state / "operations" / "default").iterdir()
            if p.is_file() and not p.is_symlink() and p.name.startswith("merge-")]


def _parses_as(data: bytes, place: str) -> bool:
    """Whether a random mutation left a registration that is valid where it lies."""
    try:
        saved = SavedAdapter.from_json(data)
    except ValueError:
        return False
    return f"{saved.tenant}/{saved.adapter_id}.json" == place


def write_object_faults(client, prefix: str, rng: random.Random) -> set[str]:
    """Hostile objects under the registry prefix; returns the keys to be reported."""
    expected = set()
    for place, data in registration_faults(rng).items():
        key = f"{prefix}/adapters/{place}"
        client.put_object(Bucket=BUCKET, Key=key, Body=data)
        if not _parses_as(data, place):
            expected.add(f"{BUCKET}/{key}")
    nested = f"{prefix}/adapters/default/sub/nested.json"  # a key deeper than <tenant>/<id>.json
    client.put_object(Bucket=BUCKET, Key=nested, Body=_dumps(_registration("default", "nested")))
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/adapters/default/not-json.txt", Body=b"hello")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/adapters/", Body=b"")  # a "folder" marker
    expected.add(f"{BUCKET}/{nested}")
    return expected


def _start(assets, n: int, first: int = 0, **overrides) -> list[BackgroundServer]:
    """Start replicas, each within a bound: a FIFO read without care would block start-up."""
    started: dict[int, BackgroundServer] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            started[i] = BackgroundServer(assets.settings(replica_id=f"replica-{i}", registry_sync_s=SYNC_S, **overrides))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(first, first + n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(started) == n and not any(t.is_alive() for t in threads), errors
    return [started[i] for i in range(first, first + n)]


def _skipped(server: BackgroundServer, state: Path | None) -> set[str]:
    """What a replica reported skipped, as places relative to the state directory (or keys)."""
    places = set()
    for where, _ in server.engine.restore_report.skipped:
        places.add(str(Path(where).relative_to(state)) if state is not None and where.startswith(str(state)) else where)
    return places


def _write_direct(kind: str, where, saved: SavedAdapter) -> None:
    """A registration written into the store by something other than a replica (an operator's
    script, a replica of another version)."""
    if kind == "directory":
        path = where / "adapters" / saved.tenant / f"{saved.adapter_id}.json"
        path.write_bytes(saved.to_json())
    else:
        client, prefix = where
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/adapters/{saved.tenant}/{saved.adapter_id}.json",
                          Body=saved.to_json())


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["directory", "object"])
def test_replicas_start_serve_and_follow_over_a_poisoned_store(assets, s3, tmp_path, kind):
    rng = random.Random(f"faults-{kind}")
    state = tmp_path / "state"
    state.mkdir()
    expected, running, hostile_operations = write_state_faults(state, rng)
    valid = next(n.removeprefix("operations/") for n in _op_files(state) if n not in hostile_operations
                 and n != f"operations/{running}")
    if kind == "directory":
        overrides, store_where = dict(state_dir=state), state
    else:
        endpoint, client = s3
        prefix = f"registry-faults-{uuid.uuid4().hex[:8]}"
        expected = {p for p in expected if not p.startswith("adapters/")}  # the registry is in the bucket
        expected |= write_object_faults(client, prefix, rng)
        # Operations stay in each replica's state directory: the replicas share one here.
        overrides = dict(state_dir=state, registry=f"s3://{BUCKET}/{prefix}", object_endpoint_url=endpoint)
        store_where = (client, prefix)

    heartbeat = "replicas/replica-fifo.json"  # read by whichever replica ends the operation it ran
    for round_ in range(1 + RESTARTS):
        servers = _start(assets, 2, first=2 * round_, **overrides)
        clients = [lc.Client(s.target, timeout=60, affinity=False) for s in servers]
        try:
            a, b = clients
            for server in servers:  # every hostile file reported, and nothing else
                got = _skipped(server, state)
                assert got - {heartbeat} == expected - {heartbeat}, sorted((got - {heartbeat}) ^ (expected - {heartbeat}))
                assert server.engine.restore_report.failed == []
            if round_ == 0:
                assert any(heartbeat in _skipped(server, state) for server in servers)
            # Each registers names of its own; the other serves them (read on first use).
            tag = f"r{round_}"
            a.load_adapter(f"{tag}-a", source="qv-r4")
            b.load_adapter(f"{tag}-b", source="mlp-r2")
            assert _tokens(b, f"{tag}-a") == assets.oracle("qv-r4", PROMPTS[1], N)
            assert _tokens(a, f"{tag}-b") == assets.oracle("mlp-r2", PROMPTS[1], N)
            # A name registered straight into the store is served by both.
            template = servers[0].engine.registry.get("default", f"{tag}-a")
            _write_direct(kind, store_where, SavedAdapter("default", f"{tag}-direct", "qv-r4", template.revision, False,
                                                          time.time(), uuid.uuid4().hex))
            for c in clients:
                assert eventually(lambda c=c: _tokens(c, f"{tag}-direct")) == assets.oracle("qv-r4", PROMPTS[1], N)
            # A replace on one is followed by the other, which served the old version.
            b.load_adapter(f"{tag}-a", source="all-r16", replace=True)
            eventually(lambda: _equal(_tokens(a, f"{tag}-a"), assets.oracle("all-r16", PROMPTS[1], N)))
            # Listings show the real registrations only; the hostile records reach nobody.
            names = {x.adapter_id for x in a.list_adapters()}
            assert {f"r{i}-{s}" for i in range(round_ + 1) for s in ("a", "b", "direct")} == names
            with grpc.insecure_channel(servers[1].target) as channel:
                stub = operations_pb2_grpc.OperationsStub(channel)
                listed = stub.ListOperations(operations_pb2.ListOperationsRequest(name="operations"), timeout=30)
                assert sorted(op.name for op in listed.operations) == sorted([f"operations/{running}", f"operations/{valid}"])
                by_name = {op.name: op for op in listed.operations}
                assert by_name[f"operations/{running}"].error.message.startswith("the server running this merge")
                assert by_name[f"operations/{valid}"].error.message == "m"
                for hostile in hostile_operations:
                    with pytest.raises(grpc.RpcError) as e:
                        stub.GetOperation(operations_pb2.GetOperationRequest(name=hostile), timeout=30)
                    assert e.value.code() is grpc.StatusCode.NOT_FOUND
            # The survivors' passes (heartbeats, orphaned operations, retention) go on over the files.
            for server in servers:
                server.engine.sync.run_once()
                server.engine.operations.expire(server.engine.settings.operation_retention_s)
        finally:
            for c in clients:
                c.close()
            for server in servers:
                server.stop()
    assert len(list((tmp_path / "elsewhere").iterdir())) == 1  # nothing was read, written or removed through the links


def _tokens(client, adapter: str) -> list[int]:
    return client.generate(adapter_id=adapter, prompt=PROMPTS[1], max_new_tokens=N).token_ids
