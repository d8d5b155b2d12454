"""API keys, roles and tenants over a real server: every RPC against every kind of caller, as a
table of expected outcomes; tenants see only their own adapters; keys expire and are revoked
by editing the file while the server runs."""

import hashlib
import os

import grpc
import pytest
import yaml
from google.longrunning import operations_pb2

import loramux.client as lc
from loramux.client.errors import from_rpc_error
from conftest import PROMPTS, eventually
from loramux.cli.main import main as cli
from loramux.server.app import BackgroundServer
from loramux.server.errors import InvalidSettings, Unauthenticated
from loramux.server.tenancy.keys import KeyStore, append_key, hash_key
from loramux.v1 import adapter_pb2, loramux_service_pb2_grpc

OK = "OK"


@pytest.fixture(scope="module")
def keyed(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    keys_file = root / "keys.yaml"
    keys = {
        "user_a": append_key(keys_file, "team-a", "user", "a-user"),
        "admin_a": append_key(keys_file, "team-a", "admin", "a-admin"),
        "operator": append_key(keys_file, "ops", "operator", "oncall"),
        "admin_b": append_key(keys_file, "team-b", "admin", "b-admin"),
        "user_b": append_key(keys_file, "team-b", "user", "b-user"),
        "expired": append_key(keys_file, "team-a", "admin", "old", expires="2020-01-01T00:00:00Z"),
    }
    server = BackgroundServer(assets.settings(auth="keys", auth_keys_file=keys_file, merge_root=root / "merged"))
    with lc.Client(server.target, api_key=keys["admin_a"]) as admin_a, lc.Client(server.target, api_key=keys["admin_b"]) as admin_b:
        admin_a.load_adapter("mine", source="qv-r4")
        admin_b.load_adapter("theirs", source="mlp-r2")
    yield server, keys, keys_file
    server.stop()


def outcome(target, api_key, rpc):
    try:
        with lc.Client(target, api_key=api_key, timeout=60) as client:
            rpc(client)
        return OK
    except grpc.RpcError as e:  # the Operations stub is called raw
        e = from_rpc_error(e)
        return f"{e.code.name}/{e.reason}"
    except lc.LoramuxError as e:
        return f"{e.code.name}/{e.reason}"


RPCS = {
    "Generate": lambda c: c.generate(prompt=PROMPTS[0], max_new_tokens=2),
    "GenerateStream": lambda c: list(c.generate_stream(prompt=PROMPTS[0], max_new_tokens=2)),
    "Tokenize": lambda c: c.tokenize(prompt=PROMPTS[0]),
    "ListAdapters": lambda c: c.list_adapters(),
    "GetAdapter": lambda c: c.get_adapter("mine"),
    "LoadAdapter": lambda c: c.load_adapter("extra", source="qv-r4", replace=True),
    "UnloadAdapter": lambda c: c.unload_adapter("extra"),
    "Merge": lambda c: c.merge("mine", "out", overwrite=True).result(timeout=60),
    "ListOperations": lambda c: c._operations.ListOperations(operations_pb2.ListOperationsRequest(), timeout=60),
    "GetServerInfo": lambda c: c.server_info(),
}
DENIED = "PERMISSION_DENIED/PERMISSION_DENIED"
NO_KEY = "UNAUTHENTICATED/UNAUTHENTICATED"
NOT_FOUND = "NOT_FOUND/ADAPTER_NOT_FOUND"
# caller -> the outcome of each RPC, in RPCS' order. Callers of team-a use team-a's adapter
# "mine"; team-b's do not see it (NOT_FOUND, as for an adapter that does not exist).
TABLE = {
    None: [NO_KEY] * 10,
    "wrong": [NO_KEY] * 10,
    "expired": ["UNAUTHENTICATED/API_KEY_EXPIRED"] * 10,
    "user_a": [OK, OK, OK, OK, OK, DENIED, DENIED, DENIED, DENIED, DENIED],
    "admin_a": [OK, OK, OK, OK, OK, OK, OK, OK, OK, DENIED],
    "user_b": [OK, OK, OK, OK, NOT_FOUND, DENIED, DENIED, DENIED, DENIED, DENIED],
    "admin_b": [OK, OK, OK, OK, NOT_FOUND, OK, OK, NOT_FOUND, OK, DENIED],
    "operator": [OK, OK, OK, OK, NOT_FOUND, OK, OK, NOT_FOUND, OK, OK],  # its own tenant "ops" holds no "mine"
}


def test_every_rpc_against_every_caller(keyed):
    server, keys, _ = keyed
    got = {}
    for caller in TABLE:
        key = {None: None, "wrong": "lmx_" + "x" * 43}.get(caller, keys.get(caller))
        got[caller] = [outcome(server.target, key, rpc) for rpc in RPCS.values()]
    assert got == TABLE


def test_tenants_see_only_their_own_adapters(keyed):
    server, keys, _ = keyed
    with lc.Client(server.target, api_key=keys["user_a"]) as a, lc.Client(server.target, api_key=keys["user_b"]) as b:
        assert [x.adapter_id for x in a.list_adapters()] == ["mine"]
        assert [x.adapter_id for x in b.list_adapters()] == ["theirs"]
        for client, other in ((a, "theirs"), (b, "mine")):
            with pytest.raises(lc.NotFound) as e:
                client.generate(adapter_id=other, prompt=PROMPTS[0], max_new_tokens=2)
            assert e.value.reason == "ADAPTER_NOT_FOUND"
            missing = pytest.raises(lc.NotFound)
            with missing as m:
                client.get_adapter("no-such-adapter")
            with pytest.raises(lc.NotFound) as e:
                client.get_adapter(other)
            # Another tenant's adapter answers exactly as one that does not exist.
            assert e.value.message.replace(other, "X") == m.value.message.replace("no-such-adapter", "X")


def test_an_operator_acts_for_the_tenant_it_names_and_no_one_else_may(keyed):
    server, keys, _ = keyed
    with grpc.insecure_channel(server.target) as channel:
        stub = loramux_service_pb2_grpc.LoramuxStub(channel)

        def listed(key, tenant):
            metadata = [("authorization", f"Bearer {key}"), ("x-loramux-tenant", tenant)]
            return [a.adapter_id for a in stub.ListAdapters(adapter_pb2.ListAdaptersRequest(), metadata=metadata).adapters]

        assert listed(keys["operator"], "team-b") == ["theirs"]
        assert listed(keys["operator"], "team-a") == ["mine"]
        assert listed(keys["admin_a"], "team-a") == ["mine"]  # naming its own tenant is fine
        with pytest.raises(grpc.RpcError) as e:
            listed(keys["admin_a"], "team-b")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:  # a malformed tenant is its own reason, not an adapter id's
            listed(keys["operator"], "team b/..")
        error = from_rpc_error(e.value)
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TENANT_INVALID")
        assert [field for field, _ in error.field_violations] == ["x-loramux-tenant"]


def test_health_needs_no_key(keyed):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, _, _ = keyed
    with grpc.insecure_channel(server.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_key_removed_from_the_file_stops_working_and_a_broken_file_keeps_the_last_keys(keyed):
    server, keys, keys_file = keyed
    store = server.running.servicer.auth.keys
    revoked = append_key(keys_file, "team-a", "user", "temporary")
    store.check()  # what the watcher thread does every second
    assert outcome(server.target, revoked, RPCS["ListAdapters"]) == OK
    data = yaml.safe_load(keys_file.read_text())
    data["keys"] = [k for k in data["keys"] if k["name"] != "temporary"]
    tmp = keys_file.with_suffix(".new")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, keys_file)
    store.check()
    assert outcome(server.target, revoked, RPCS["ListAdapters"]) == NO_KEY
    saved = keys_file.read_text()
    keys_file.write_text("keys: [this is not, a key entry]\n")
    try:  # the last good keys stay in force
        assert not store.check()
        assert outcome(server.target, keys["user_a"], RPCS["ListAdapters"]) == OK
    finally:
        keys_file.write_text(saved)


def test_keys_file_holds_only_hashes_and_bad_files_are_refused(tmp_path, capsys):
    path = tmp_path / "k" / "keys.json"
    assert cli(["keys", "create", "--tenant", "t1", "--role", "user", "--keys-file", str(path), "--name", "svc"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("lmx_") and len(key) == 47 and key not in path.read_text()
    entry = yaml.safe_load(path.read_text())["keys"][0]
    assert entry == {"name": "svc", "tenant": "t1", "role": "user", "sha256": hashlib.sha256(key.encode()).hexdigest()}
    assert KeyStore(path).identify(key).tenant == "t1"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert cli(["keys", "create", "--tenant", "bad tenant", "--role", "user", "--keys-file", str(path)]) == 2
    for text, why in (
        ("keys:\n- {tenant: t, role: root, sha256: " + "ab" * 32 + "}\n", "role must be one of"),
        ("keys:\n- {tenant: t, role: user, sha256: abc}\n", "sha256 must be 64 hex digits"),
        ("keys:\n- {tenant: t, role: user, sha256: " + "ab" * 32 + ", key: lmx_x}\n", "unknown fields"),
        ("keys:\n- {tenant: t, role: user, sha256: " + "ab" * 32 + ", expires: soon}\n", "not an ISO 8601 time"),
        ("[1, 2]\n", "must be a mapping with a 'keys' list"),
    ):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(InvalidSettings) as e:
            KeyStore(bad)
        assert why in e.value.message and e.value.field == "auth_keys_file"
    assert hash_key("abc") == hashlib.sha256(b"abc").hexdigest()


def test_serve_refuses_a_bad_keys_file_before_loading_the_model(assets, tmp_path, capsys):
    bad = tmp_path / "keys.yaml"
    bad.write_text("keys: [1]\n")
    assert cli(["serve", "--model", str(tmp_path / "no-model-here"), "--auth-keys-file", str(bad)]) == 2
    assert "--auth-keys-file: keys file keys.yaml: keys[0] must be a mapping" in capsys.readouterr().err


def test_merge_outputs_live_under_each_tenants_own_directory(keyed):
    server, keys, _ = keyed
    root = server.engine.settings.merge_root
    with lc.Client(server.target, api_key=keys["admin_a"]) as a, lc.Client(server.target, api_key=keys["admin_b"]) as b:
        mine = a.merge("mine", "shared-name", overwrite=True).result(timeout=60)
        (root / "team-b").mkdir(exist_ok=True)
        theirs = b.merge("theirs", "shared-name", overwrite=True).result(timeout=60)
        # The same output_dir is two directories; neither tenant can reach the other's.
        # Each sees its output by the name it gave, never the server's path.
        assert mine.output_path == theirs.output_path == "shared-name"
        assert (root / "team-a" / "shared-name" / "loramux_merge.json").is_file()
        assert (root / "team-b" / "shared-name" / "loramux_merge.json").is_file()
        with pytest.raises(lc.InvalidArgument) as e:
            b.merge("theirs", "../team-a/shared-name", overwrite=True)
        assert e.value.reason == "OUTPUT_OUTSIDE_ROOT"
    assert '"adapter_id": "mine"' in (root / "team-a" / "shared-name" / "loramux_merge.json").read_text()


def test_tenant_label_is_bounded_and_a_flooding_tenant_does_not_starve_another(assets, tmp_path):
    import threading
    import time

    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from loramux.server.telemetry.providers import build_telemetry

    keys_file = tmp_path / "keys.yaml"
    flood, calm = append_key(keys_file, "flood", "user"), append_key(keys_file, "calm", "user")
    operator = append_key(keys_file, "ops", "operator")
    settings = assets.settings(auth="keys", auth_keys_file=keys_file, max_batch_size=2, batch_window_ms=0)
    reader = InMemoryMetricReader()
    with BackgroundServer(settings, telemetry=build_telemetry(settings, metric_readers=[reader])) as server:
        first_token: dict[str, float] = {}

        def stream(name, key):
            with lc.Client(server.target, api_key=key) as client:
                for _ in client.generate_stream(prompt=PROMPTS[3], max_new_tokens=8, ignore_eos=True):
                    first_token.setdefault(name, time.monotonic())

        threads = [threading.Thread(target=stream, args=(f"flood{i}", flood)) for i in range(10)]
        for t in threads:
            t.start()
        eventually(lambda: server.engine.stats().waiting >= 6)  # the flood fills the batch and the queue
        calm_thread = threading.Thread(target=stream, args=("calm", calm))
        calm_thread.start()
        for t in (*threads, calm_thread):
            t.join(60)
        ahead = sorted(n for n, at in first_token.items() if n != "calm" and at < first_token["calm"])
        # Tenants take turns: calm's request starts at the first free row, behind at most the
        # flood's rows that were running or admitted with it, not behind the flood's queue.
        assert len(first_token) == 11 and len(ahead) <= 4, ahead

        with grpc.insecure_channel(server.target) as channel:  # an operator acting for a tenant no file names
            stub = loramux_service_pb2_grpc.LoramuxStub(channel)
            from loramux.v1 import generation_pb2

            stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPTS[0], max_new_tokens=2),
                          metadata=[("authorization", f"Bearer {operator}"), ("x-loramux-tenant", "made-up-tenant")])
        points = {}
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == "loramux.generate.tokens":
                        points = {p.attributes["tenant"]: p.value for p in metric.data.data_points}
        assert points == {"flood": 80, "calm": 8, "other": 2}


def test_keys_create_defaults_to_a_file_in_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(["keys", "create", "--tenant", "t1", "--role", "admin"]) == 0
    key = capsys.readouterr().out.strip()
    assert KeyStore(tmp_path / "loramux-keys.yaml").identify(key).role == "admin"


def test_a_keys_file_cut_short_emptied_or_gone_never_locks_keys_out(tmp_path):
    """A reload that would drop more than half the keys in force is refused unless the file
    states expected_keys; a missing file, a FIFO or a file cut mid-entry keep the last good keys."""
    path = tmp_path / "keys.yaml"
    keys = [append_key(path, f"team-{i}", "user", f"k{i}") for i in range(5)]
    full = path.read_text()
    store = KeyStore(path)
    entries = yaml.safe_load(full)["keys"]

    def write(text: str) -> bool:
        tmp = path.with_suffix(".new")
        tmp.write_text(text)
        os.replace(tmp, path)
        return store.check()

    assert not write("")  # emptied
    assert not write(yaml.safe_dump({"keys": entries[:1]}))  # cut after its first entry
    assert not write(full[: len(full) // 2])  # cut mid-entry: does not parse
    path.unlink()
    assert not store.check()  # gone
    os.mkfifo(path)
    assert not store.check()  # not a regular file (and opening it did not block)
    path.unlink()
    assert [store.identify(k).tenant for k in keys] == [f"team-{i}" for i in range(5)]
    assert write(yaml.safe_dump({"keys": entries[:3]}))  # two of five revoked: a normal edit
    with pytest.raises(Unauthenticated):
        store.identify(keys[4])
    assert write(yaml.safe_dump({"keys": entries[:1], "expected_keys": 1}))  # a deliberate large revocation
    assert store.identify(keys[0]).tenant == "team-0" and len(store) == 1
    assert not write(yaml.safe_dump({"keys": [], "expected_keys": 1}))  # states 1, holds none: cut short
    assert write(yaml.safe_dump({"keys": [], "expected_keys": 0}))  # every key revoked, on purpose
    with pytest.raises(Unauthenticated):
        store.identify(keys[0])
    path.write_text(yaml.safe_dump({"keys": entries[:2], "expected_keys": 3}))
    with pytest.raises(InvalidSettings) as e:  # at start-up too
        KeyStore(path)
    assert "expected_keys is 3 but the file holds 2 keys" in e.value.message
    # `keys create` keeps a stated count true.
    path.write_text(yaml.safe_dump({"keys": entries[:2], "expected_keys": 2}))
    append_key(path, "team-new", "user")
    assert yaml.safe_load(path.read_text())["expected_keys"] == 3 and len(KeyStore(path)) == 3


def test_cli_lists_revokes_and_rotates_keys_and_an_operator_names_its_tenant(keyed, capsys, monkeypatch):
    import json

    server, keys, keys_file = keyed
    store = server.running.servicer.auth.keys
    f = str(keys_file)
    assert cli(["keys", "list", "--keys-file", f, "-o", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {"a-user", "oncall", "old"} <= {e["name"] for e in listed}
    assert all(set(e) == {"id", "name", "tenant", "role", "expires"} and len(e["id"]) == 12 for e in listed)
    assert next(e for e in listed if e["name"] == "old")["expires"] == "2020-01-01T00:00:00+00:00"
    assert keys["user_a"] not in keys_file.read_text()  # only hashes, also after the CLI wrote the file

    assert cli(["keys", "create", "--tenant", "team-a", "--role", "admin", "--name", "rotating", "--keys-file", f]) == 0
    captured = capsys.readouterr()
    old = captured.out.strip()
    assert "added an admin key for tenant 'team-a'" in captured.err
    assert cli(["keys", "rotate", "rotating", "--keys-file", f]) == 0
    new = capsys.readouterr().out.strip()
    store.check()
    assert outcome(server.target, old, RPCS["ListAdapters"]) == OK  # for a day yet
    assert outcome(server.target, new, RPCS["ListAdapters"]) == OK
    assert cli(["keys", "revoke", "rotating", "--keys-file", f]) == 2  # two keys are named so now
    assert "2 keys match 'rotating'" in capsys.readouterr().err
    assert cli(["keys", "list", "--keys-file", f, "-o", "json"]) == 0
    rotated = [e for e in json.loads(capsys.readouterr().out) if e["name"] == "rotating"]
    old_entry = next(e for e in rotated if e["expires"] is not None)
    assert cli(["keys", "revoke", old_entry["id"], "--keys-file", f]) == 0
    store.check()
    assert outcome(server.target, old, RPCS["ListAdapters"]) == NO_KEY
    assert outcome(server.target, new, RPCS["ListAdapters"]) == OK
    assert cli(["keys", "rotate", "rotating", "--old-expires-in", "0", "--keys-file", f]) == 0
    newest = capsys.readouterr().out.strip()
    store.check()
    assert outcome(server.target, new, RPCS["ListAdapters"]) == "UNAUTHENTICATED/API_KEY_EXPIRED"
    assert outcome(server.target, newest, RPCS["ListAdapters"]) == OK

    # an operator acts for the tenant it names, by flag or by LORAMUX_TENANT
    assert cli(["adapters", "list", "--target", server.target, "--api-key", keys["operator"], "--tenant", "team-b",
                "-o", "json"]) == 0
    assert [a["adapter_id"] for a in json.loads(capsys.readouterr().out)] == ["theirs"]
    monkeypatch.setenv("LORAMUX_TENANT", "team-a")
    assert cli(["--api-key", keys["operator"], "--target", server.target, "-o", "json", "adapters", "list"]) == 0
    assert [a["adapter_id"] for a in json.loads(capsys.readouterr().out)] == ["mine"]
    assert cli(["adapters", "list", "--target", server.target, "--api-key", keys["user_a"], "--tenant", "team-b"]) == 1
    mine = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # (the server logs too)
    assert mine == ["error: PERMISSION_DENIED: only an operator may act for another tenant"]


def test_keys_file_edits_apply_keep_the_files_mode_and_never_revive_a_key(tmp_path):
    """Revoking the last key (or half of them) applies at the next reload: the file says it
    expects fewer keys. A rotation never moves an expiry later. An edit keeps the file's mode
    (the server's user may read it through its group) and writes through a symlink. An id as
    `keys list` shows it matches whatever case the file holds."""
    import datetime
    import stat

    from loramux.server.errors import Unauthenticated
    from loramux.server.tenancy.keys import KeyStore, list_keys, revoke_key, rotate_key

    real = tmp_path / "real-keys.yaml"
    only = append_key(real, "t1", "user", "only")
    real.chmod(0o640)
    link = tmp_path / "keys.yaml"
    link.symlink_to(real)
    store = KeyStore(link)
    assert store.identify(only).tenant == "t1"
    revoke_key(link, "only")
    assert store.check()
    with pytest.raises(Unauthenticated):
        store.identify(only)
    assert link.is_symlink() and stat.S_IMODE(real.stat().st_mode) == 0o640

    soon = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)).isoformat(timespec="seconds")
    expiring = append_key(real, "t1", "admin", "expiring", expires=soon)
    append_key(real, "t1", "user", "expired", expires="2020-01-01T00:00:00Z")
    _, old = rotate_key(link, "expiring", "2999-01-01T00:00:00+00:00")  # later than it was: kept
    assert old["expires"] == soon.replace("Z", "+00:00")
    _, old = rotate_key(link, "expired", "2999-01-01T00:00:00+00:00")
    assert old["expires"] == "2020-01-01T00:00:00+00:00"
    assert store.check() and store.identify(expiring).role == "admin"
    with pytest.raises(Unauthenticated):
        store.identify(only)
    data = yaml.safe_load(real.read_text())
    data["keys"][0]["sha256"] = data["keys"][0]["sha256"].upper()
    real.write_text(yaml.safe_dump(data, sort_keys=False))
    shown = list_keys(link)[0]
    assert revoke_key(link, shown["id"])["name"] == shown["name"]
