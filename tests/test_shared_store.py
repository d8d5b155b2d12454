"""Replicas are caches of a shared store: three servers on loopback share registrations
through one `--state-dir` or through object storage (moto's S3 server on loopback), with
adapters fetched from that object storage. Register on one, generate on another; replace,
pin and unload on one, the others follow within the sync interval; restart all, nothing is
lost. Plus the store's own contract under concurrent writers, and object sources' checks."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from pathlib import Path

import boto3
import pytest

import loramux.client as lc
import conftest
from conftest import PROMPTS
from loramux.server.adapters.objects import ObjectStores
from loramux.server.app import BackgroundServer
from loramux.server.errors import AdapterInvalid
from loramux.server.store.operations import OperationStore
from loramux.server.store.registrations import DirectoryRegistrations
from loramux.server.store.state import SavedAdapter, StateStore

N = 6
SYNC_S = 0.2
FOLLOW_S = 15.0  # what a test waits at most for a change to reach a replica (SYNC_S plus a slow CI's reads)
BUCKET = "loramux-test"


@pytest.fixture(scope="module")
def s3(assets):
    """An S3 server on loopback with the test adapters under s3://loramux-test/adapters/."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:  # botocore's standard credentials, as a pod's Secret gives them
        env.setenv("AWS_ACCESS_KEY_ID", "test")
        env.setenv("AWS_SECRET_ACCESS_KEY", "test")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        for adapter in ("qv-r4", "all-r16", "pattern", "mlp-r2"):
            upload(client, assets.adapters / adapter, f"adapters/{adapter}")
        yield endpoint, client
    server.stop()


def upload(client, directory: Path, prefix: str) -> None:
    for path in directory.iterdir():
        if path.is_file():
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.name}", Body=path.read_bytes())


def start(assets, n: int, **overrides) -> list[BackgroundServer]:
    return [BackgroundServer(assets.settings(replica_id=f"replica-{i}", registry_sync_s=SYNC_S, **overrides))
            for i in range(n)]


def eventually(check, within: float = FOLLOW_S):
    """A change made on one replica, seen on another: a call refused meanwhile is retried too."""
    return conftest.eventually(check, within, retry_on=(AssertionError, lc.LoramuxError), interval=0.05)


def tokens(client, adapter: str, prompt: str = PROMPTS[1]) -> list[int]:
    return client.generate(adapter_id=adapter, prompt=prompt, max_new_tokens=N).token_ids


STORES = {
    # every replica on one state directory (a ReadWriteMany volume), adapters from local roots
    "directory": lambda tmp, endpoint: (dict(state_dir=tmp / "shared-state"), ""),
    # registrations in object storage, adapters fetched from it; each replica its own state directory
    "object": lambda tmp, endpoint: (dict(registry=f"s3://{BUCKET}/registry", object_roots=(f"s3://{BUCKET}/adapters",),
                                          object_endpoint_url=endpoint), f"s3://{BUCKET}/adapters/"),
}


@pytest.mark.parametrize("kind", list(STORES))
def test_three_replicas_serve_follow_and_survive_a_full_restart(assets, s3, tmp_path, kind):
    endpoint, _ = s3
    overrides, prefix = STORES[kind](tmp_path, endpoint)
    servers = start(assets, 3, **overrides)
    clients = [lc.Client(s.target, timeout=60, affinity=False) for s in servers]
    try:
        a, b, c = clients
        info = a.load_adapter("shared", source=prefix + "qv-r4")
        assert info.rank == 4
        # Registered on a, generated on b and c at once: read on demand, checked against the revision.
        assert tokens(b, "shared") == tokens(c, "shared") == assets.oracle("qv-r4", PROMPTS[1], N)
        assert b.get_adapter("shared").revision == info.revision
        # A name registered elsewhere is listed everywhere (c reads it on demand if its sync has not).
        a.load_adapter("second", source=prefix + "mlp-r2")
        assert [x.adapter_id for x in c.list_adapters()] == ["second", "shared"]

        # Replace on b: a and c follow within the sync interval.
        b.load_adapter("shared", source=prefix + "all-r16", replace=True)
        for client in (a, c):
            eventually(lambda: _equal(tokens(client, "shared"), assets.oracle("all-r16", PROMPTS[1], N)))
        # Loading the name again from another source, without replace, is refused on every replica.
        for client in clients:
            with pytest.raises(lc.AlreadyExists) as e:
                client.load_adapter("shared", source=prefix + "pattern")
            assert e.value.reason == "ADAPTER_ALREADY_EXISTS"

        # Pin on c: a and b pin it too.
        c.load_adapter("second", source=prefix + "mlp-r2", pin=True)
        for client in (a, b):
            eventually(lambda: _equal((client.get_adapter("second").pinned, client.get_adapter("second").tier),
                                      (True, "accelerator")))

        # Unload on a: b and c forget it.
        a.unload_adapter("second")
        for client in (b, c):
            eventually(lambda: _refused(lc.NotFound, "ADAPTER_NOT_FOUND", tokens, client, "second"))
        with pytest.raises(lc.NotFound):
            c.unload_adapter("second")

        # Restart every replica: every registration and pin comes back.
        a.load_adapter("kept-pinned", source=prefix + "pattern", pin=True)
        for server in servers:
            server.stop()
        for client in clients:
            client.close()
        servers = start(assets, 3, **overrides)
        clients = [lc.Client(s.target, timeout=60, affinity=False) for s in servers]
        for server, client in zip(servers, clients):
            assert server.engine.restore_report.failed == []
            listed = {x.adapter_id: x for x in client.list_adapters()}
            assert sorted(listed) == ["kept-pinned", "shared"]
            assert listed["kept-pinned"].pinned and listed["kept-pinned"].tier == "accelerator"
            assert tokens(client, "shared") == assets.oracle("all-r16", PROMPTS[1], N)
            assert tokens(client, "kept-pinned") == assets.oracle("pattern", PROMPTS[1], N)
    finally:
        for client in clients:
            client.close()
        for server in servers:
            if not server.running.stopped:
                server.stop()


def _equal(got, want):
    assert got == want
    return got


def _refused(cls, reason, fn, *args):
    try:
        fn(*args)
    except cls as e:
        assert e.reason == reason
        return
    raise AssertionError("not refused yet")


def _race(clients: list, call) -> list:
    """`call(i, client)` on every client at once (after a barrier); each one's outcome: what
    it returned, or the reason (and quota) of the error it raised."""
    import threading

    outcomes: list[object] = [None] * len(clients)
    barrier = threading.Barrier(len(clients))

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = call(i, clients[i])
        except lc.LoramuxError as e:
            outcomes[i] = (e.reason, e.metadata["quota"]) if e.reason == "QUOTA_EXCEEDED" else e.reason

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return outcomes


def test_racing_registrations_of_one_name_have_one_winner(assets, tmp_path):
    """Three replicas register one name from three sources at once: one wins everywhere."""
    servers = start(assets, 3, state_dir=tmp_path / "state")
    clients = [lc.Client(s.target, timeout=60, affinity=False) for s in servers]
    sources = ["qv-r4", "pattern", "mlp-r2"]
    try:
        outcomes = _race(clients, lambda i, c: c.load_adapter("contested", source=sources[i]).source)
        won = [o for o in outcomes if o in sources]
        assert len(won) == 1 and sorted(o for o in outcomes if o not in sources) == ["ADAPTER_ALREADY_EXISTS"] * 2, outcomes
        for client in clients:
            assert tokens(client, "contested") == assets.oracle(won[0], PROMPTS[1], N)
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.stop()


def test_racing_replicas_never_leave_a_tenant_over_its_adapter_quota(assets, tmp_path):
    """Three replicas each register a new name for a tenant whose quota is one, at once: each
    replica's check before reading sees none registered, so each load counts the store again
    after registering and withdraws its own if the tenant went over. At most one stays (all may
    withdraw: a refused caller retries), and every replica ends up listing the same."""
    from loramux.server.tenancy.keys import append_key

    keys_file = tmp_path / "keys.yaml"
    key = append_key(keys_file, "team", "admin", "team")
    keys_file.write_text(keys_file.read_text() + "tenants:\n  team:\n    quotas: {adapters: 1}\n")
    servers = start(assets, 3, state_dir=tmp_path / "state", auth="keys", auth_keys_file=keys_file)
    clients = [lc.Client(s.target, api_key=key, timeout=60, affinity=False) for s in servers]
    sources = ["qv-r4", "pattern", "mlp-r2"]
    try:
        outcomes = _race(clients, lambda i, c: c.load_adapter(f"name-{i}", source=sources[i]) and "OK")
        kept = [f"name-{i}" for i, o in enumerate(outcomes) if o == "OK"]
        assert len(kept) <= 1 and all(o == "OK" or o == ("QUOTA_EXCEEDED", "adapters") for o in outcomes), outcomes
        for client in clients:
            eventually(lambda: _equal([a.adapter_id for a in client.list_adapters()], kept))
        if not kept:  # every racer withdrew: the quota's room is there for a retry
            clients[0].load_adapter("name-0", source=sources[0])
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.stop()


def test_a_changed_object_is_detected_and_a_replace_reads_it(assets, s3, tmp_path):
    endpoint, client = s3
    upload(client, assets.adapters / "qv-r4", "adapters/moving")
    settings = dict(registry=f"s3://{BUCKET}/registry-changed", object_roots=(f"s3://{BUCKET}/adapters",),
                    object_endpoint_url=endpoint)
    first, = start(assets, 1, **settings)
    try:
        with lc.Client(first.target, timeout=60) as a:
            a.load_adapter("moving", source=f"s3://{BUCKET}/adapters/moving")
            upload(client, assets.adapters / "all-r16", "adapters/moving")  # the object changes under its name
            second, = start(assets, 1, **settings)
            try:
                # Not pinned: start-up does not read it; the first request that names it does.
                assert second.engine.restore_report.failed == second.engine.restore_report.restored == []
                with lc.Client(second.target, timeout=60) as b:
                    _refused(lc.FailedPrecondition, "ADAPTER_FILES_CHANGED", tokens, b, "moving")
                    b.load_adapter("moving", source=f"s3://{BUCKET}/adapters/moving", replace=True)
                    assert tokens(b, "moving") == assets.oracle("all-r16", PROMPTS[1], N)
                eventually(lambda: _equal(tokens(a, "moving"), assets.oracle("all-r16", PROMPTS[1], N)))
            finally:
                second.stop()
    finally:
        first.stop()


def test_object_sources_are_checked_before_anything_is_fetched(assets, s3, tmp_path):
    endpoint, _ = s3
    server, = start(assets, 1, object_roots=(f"s3://{BUCKET}/adapters/qv-r4",), object_endpoint_url=endpoint)
    try:
        with lc.Client(server.target, timeout=60) as c:
            for source, cls, reason in [
                (f"s3://{BUCKET}/adapters/all-r16", lc.InvalidArgument, "SOURCE_NOT_ALLOWED"),  # outside the object root
                (f"s3://{BUCKET}/adapters/qv-r4/../all-r16", lc.InvalidArgument, "SOURCE_INVALID"),
                (f"s3://{BUCKET}/adapters/qv-r4//x", lc.InvalidArgument, "SOURCE_INVALID"),
                (f"s3://{BUCKET}/adapters/qv-r4/nothing-here", lc.NotFound, "SOURCE_NOT_FOUND"),
                (f"gs://{BUCKET}/adapters/qv-r4", lc.InvalidArgument, "SOURCE_NOT_ALLOWED"),
            ]:
                with pytest.raises(cls) as e:
                    c.load_adapter("x", source=source)
                assert e.value.reason == reason, source
            assert c.list_adapters() == []
            info = c.load_adapter("ok", source=f"s3://{BUCKET}/adapters/qv-r4/")
            assert tokens(c, "ok") == assets.oracle("qv-r4", PROMPTS[1], N)
            cache = server.engine.objects.cache_dir
            assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1
            c.unload_adapter("ok")
            assert list(cache.iterdir()) == []  # the local copy goes with the last registration using it
            assert info.revision.startswith("sha256:")
    finally:
        server.stop()


def test_a_download_larger_than_an_adapter_can_be_is_refused_before_it_is_fetched(assets, s3, tmp_path):
    endpoint, _ = s3
    settings = assets.settings(object_roots=(f"s3://{BUCKET}/adapters",), object_endpoint_url=endpoint,
                               object_cache_dir=tmp_path / "objects")
    objects = ObjectStores(settings, max_bytes=1000)
    with pytest.raises(AdapterInvalid) as e:
        objects.fetch(f"s3://{BUCKET}/adapters/all-r16")
    assert e.value.reason == "ADAPTER_TOO_LARGE"
    assert list((tmp_path / "objects").iterdir()) == []


def _hammer(directory: str, worker: int, rounds: int) -> None:
    store = DirectoryRegistrations(Path(directory))
    for i in range(rounds):
        saved = SavedAdapter("t", f"name-{i % 5}", f"src-{worker}", "rev", i % 2 == 0, time.time(), f"{worker}-{i}")
        (store.create, store.put, store.update)[i % 3](saved)
        if i % 7 == 0:
            store.delete("t", f"name-{i % 5}")


def test_the_directory_store_stays_whole_under_concurrent_writers(tmp_path):
    """Four processes create, overwrite and delete five names as fast as they can while this
    one reads: every read is a whole registration, and create never overwrites."""
    store = DirectoryRegistrations(tmp_path / "adapters")
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_hammer, args=(str(tmp_path / "adapters"), w, 300)) for w in range(4)]
    for w in workers:
        w.start()
    reads = 0
    while any(w.is_alive() for w in workers):
        for saved in store.all():
            assert saved.tenant == "t" and saved.source.startswith("src-") and saved.generation
            reads += 1
    for w in workers:
        w.join()
        assert w.exitcode == 0
    assert reads > 0
    assert not [p for p in (tmp_path / "adapters").rglob(".tmp-*")]  # no temporary left behind
    first = SavedAdapter("t", "fresh", "mine", "r", False, 1.0, "g1")
    assert store.create(first) == first
    assert store.create(SavedAdapter("t", "fresh", "theirs", "r", False, 2.0, "g2")) == first
    assert not store.update(SavedAdapter("t", "fresh", "mine", "r", True, 1.0, "stale"))
    store.delete("t", "fresh", generation="stale")
    assert store.get("t", "fresh") == first


def test_operations_of_a_replica_that_stopped_end_as_interrupted(tmp_path):
    mine = StateStore(tmp_path, "replica-a")
    ghost = StateStore(tmp_path, "replica-gone")
    busy = StateStore(tmp_path, "replica-busy")
    body = {"metadata": {"adapter_id": "x"}, "create_time": time.time(), "done": False, "end_time": None}
    ghost.put_operation("operations/merge-" + "a" * 32, "default", body)
    busy.put_operation("operations/merge-" + "b" * 32, "default", body)
    busy.heartbeat()
    old = time.time() - 60
    ghost.heartbeat()
    os.utime(tmp_path / "replicas" / "replica-gone.json", (old, old))
    (tmp_path / "replicas" / "replica-gone.json").write_text('{"replica": "replica-gone", "time": %f}' % old)

    operations = OperationStore(mine)
    assert operations.restore(lease_s=10.0) == 1  # the ghost's; the busy replica's runs on
    ended = operations.get("default", "operations/merge-" + "a" * 32)
    assert ended.done and ended.error.reason == "INTERRUPTED_BY_RESTART" and not ended.foreign
    running = operations.get("default", "operations/merge-" + "b" * 32)
    assert running.foreign and not running.done
    assert {op.name for op in operations.list("default")} == {"operations/merge-" + "a" * 32, "operations/merge-" + "b" * 32}
    # Another replica now reads the interrupted record from the shared files.
    assert OperationStore(busy).get("default", "operations/merge-" + "a" * 32).error.reason == "INTERRUPTED_BY_RESTART"


def test_the_object_registry_keeps_the_same_contract(s3):
    """Create never overwrites (S3's conditional write), update and delete only touch the
    generation they name, and a missing name is None, not an error."""
    import fsspec

    from loramux.server.store.registrations import ObjectRegistrations

    endpoint, _ = s3
    store = ObjectRegistrations(f"s3://{BUCKET}/contract", fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint}))
    first = SavedAdapter("t", "name", "mine", "r", False, 1.0, "g1")
    assert store.get("t", "name") is None and store.all() == []
    assert store.create(first) == first
    assert store.create(SavedAdapter("t", "name", "theirs", "r", False, 2.0, "g2")) == first
    assert not store.update(SavedAdapter("t", "name", "mine", "r", True, 1.0, "stale"))
    pinned = SavedAdapter("t", "name", "mine", "r", True, 1.0, "g1")
    other_tenant = SavedAdapter("t2", "name", "x", "r", False, 3.0, "g3")
    assert store.update(pinned) and store.create(other_tenant) == other_tenant
    assert store.all() == [pinned, other_tenant] and store.all("t") == [pinned] and store.all("t2") == [other_tenant]
    store.delete("t2", "name")
    store.delete("t", "name", generation="stale")
    assert store.get("t", "name") == pinned
    store.delete("t", "name")
    assert store.get("t", "name") is None and store.all() == []


@pytest.mark.parametrize("kind", ["directory", "object"])
def test_a_listing_reads_again_only_the_registrations_that_changed(s3, tmp_path, monkeypatch, kind):
    """Every replica lists the registry at every sync pass: an unchanged registration is not
    read again, a changed, new or deleted one is seen at once, and what a listing returns is
    what a store with nothing remembered returns."""
    import fsspec

    from loramux.server.store import registrations
    from loramux.server.store.registrations import DirectoryRegistrations, ObjectRegistrations

    reads: list[str] = []
    if kind == "directory":
        def make():
            return DirectoryRegistrations(tmp_path / "registry")

        real = registrations.read_record
        monkeypatch.setattr(registrations, "read_record", lambda path, limit: (reads.append(path.name), real(path, limit))[1])
    else:
        endpoint, _ = s3
        fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint}, use_listings_cache=False,
                               skip_instance_cache=True)
        real_cat = fs.cat_file

        def counting_cat(key, **kwargs):
            reads.append(key.rsplit("/", 1)[-1])
            return real_cat(key, **kwargs)

        def make():
            return ObjectRegistrations(f"s3://{BUCKET}/listing-{tmp_path.name}", fs)

        monkeypatch.setattr(fs, "cat_file", counting_cat)
    store = make()
    saved = {n: SavedAdapter("t", n, f"src-{n}", "r", False, float(i), f"g-{n}") for i, n in enumerate("abc")}
    for s in saved.values():
        store.create(s)
    store.create(SavedAdapter("u", "d", "src-d", "r", False, 9.0, "g-d"))

    def listed(tenant=None):
        reads.clear()
        got = store.all(tenant)
        counted = sorted(reads)
        assert got == make().all(tenant)  # a store that remembers nothing agrees
        return [s.adapter_id for s in got], counted

    assert listed() == (["a", "b", "c", "d"], ["a.json", "b.json", "c.json", "d.json"])  # first listing: all read
    assert listed() == (["a", "b", "c", "d"], [])  # nothing changed: nothing read
    assert listed("u") == (["d"], [])
    assert store.update(dataclasses.replace(saved["b"], pinned=True))
    assert listed() == (["a", "b", "c", "d"], ["b.json"]) and store.all()[1].pinned
    store.delete("t", "a")
    store.create(SavedAdapter("t", "e", "src-e", "r", False, 5.0, "g-e"))
    assert listed("t") == (["b", "c", "e"], ["e.json"])
    assert listed() == (["b", "c", "e", "d"], [])


def test_a_registration_is_checked_against_the_tenants_sources_whenever_a_replica_reads_it(assets, tmp_path):
    """A tenant confined to its own directory registers there; once the keys file confines it
    elsewhere, a replica starting (or following the registration) refuses to read it."""
    from loramux.server.tenancy.keys import append_key

    assets.copy_adapter("qv-r4", "team-dir/qv")
    keys_file = tmp_path / "keys.yaml"
    key = append_key(keys_file, "team", "admin", "team")
    keys = keys_file.read_text()
    keys_file.write_text(keys + "tenants:\n  team:\n    sources: {roots: [team-dir]}\n")
    settings = dict(auth="keys", auth_keys_file=keys_file, state_dir=tmp_path / "state")
    first, = start(assets, 1, **settings)
    try:
        with lc.Client(first.target, timeout=60, api_key=key) as c:
            c.load_adapter("qv", source="qv")
            assert tokens(c, "qv") == assets.oracle("qv-r4", PROMPTS[1], N)
    finally:
        first.stop()
    (assets.adapters / "elsewhere").mkdir(exist_ok=True)
    keys_file.write_text(keys + "tenants:\n  team:\n    sources: {roots: [elsewhere]}\n")
    second, = start(assets, 1, **settings)
    try:
        assert second.engine.restore_report.failed == []  # read on first use, not at start-up
        with lc.Client(second.target, timeout=60, api_key=key) as c:
            _refused(lc.NotFound, "SOURCE_NOT_FOUND", tokens, c, "qv")  # not under the tenant's roots now
    finally:
        second.stop()


def test_start_up_sweeps_only_its_own_merge_leftovers_and_those_of_stopped_replicas(assets, tmp_path):
    """Replicas sharing a merge root: a starting replica removes its own temporaries and those
    of a replica that was killed (its heartbeat went stale), never a live replica's merge."""
    state, merged = tmp_path / "state", tmp_path / "merged" / "default"
    merged.mkdir(parents=True)
    StateStore(state, "busy").heartbeat()
    gone = StateStore(state, "gone")
    gone.heartbeat()
    stale = json.loads((state / "replicas" / "gone.json").read_text())
    stale["time"] -= 3600
    (state / "replicas" / "gone.json").write_text(json.dumps(stale))
    for name in (".loramux-merge-tmp-busy@out-1", ".loramux-merge-tmp-gone@out-2", ".loramux-merge-tmp-replica-0@out-3",
                 ".loramux-merge-old-gone@out-4", ".loramux-merge-tmp-legacy-5"):
        (merged / name).mkdir()
    server, = start(assets, 1, state_dir=state, merge_root=tmp_path / "merged")
    try:
        assert sorted(p.name for p in merged.iterdir()) == [".loramux-merge-tmp-busy@out-1"]
        assert server.engine.restore_report.swept == 4
    finally:
        server.stop()


def test_an_unknown_name_is_not_looked_up_again_at_once(assets, tmp_path):
    """A storm of requests for a name nobody registered costs one store read a second, not one each."""
    from loramux.server.adapters.registry import MISS_TTL_S

    server, = start(assets, 1, state_dir=tmp_path / "state")
    try:
        registry = server.engine.registry
        reads = []
        original = registry._store.get
        registry._store.get = lambda *key: reads.append(key) or original(*key)
        with lc.Client(server.target, timeout=60) as c:
            for _ in range(20):
                _refused(lc.NotFound, "ADAPTER_NOT_FOUND", tokens, c, "nobody")
            assert len(reads) == 1
            time.sleep(MISS_TTL_S)
            c.load_adapter("nobody", source="qv-r4")  # registered: found at once, the miss forgotten
            assert tokens(c, "nobody") == assets.oracle("qv-r4", PROMPTS[1], N)
    finally:
        server.stop()


def test_an_object_store_adapter_brings_its_chat_template(assets, s3, tmp_path):
    endpoint, client = s3
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    upload(client, assets.adapters / "qv-r4", "templated/qv-r4")
    client.put_object(Bucket=BUCKET, Key="templated/qv-r4/chat_template.jinja", Body=template.encode())
    server, = start(assets, 1, object_roots=(f"s3://{BUCKET}/templated",), object_endpoint_url=endpoint,
                    object_cache_dir=tmp_path / "objects")
    try:
        with lc.Client(server.target, timeout=60) as c:
            c.load_adapter("t", source=f"s3://{BUCKET}/templated/qv-r4")
            expected = assets.tokenizer("<<fox>>", add_special_tokens=False)["input_ids"]
            assert c.tokenize(messages=[("user", "fox")], adapter_id="t").token_ids == expected
    finally:
        server.stop()
