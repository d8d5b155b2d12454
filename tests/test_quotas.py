"""Per-tenant quotas from the keys file, over a real server: each limit reached gives
RESOURCE_EXHAUSTED / QUOTA_EXCEEDED with its exact QuotaFailure (and RetryInfo where waiting
helps), while another tenant is unaffected."""

import threading

import pytest

import loramux.client as lc
from conftest import PROMPTS, eventually
from loramux.server.app import BackgroundServer
from loramux.server.tenancy.keys import append_key


@pytest.fixture(scope="module")
def quota_server(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("quotas")
    keys_file = root / "keys.yaml"
    keys = {t: append_key(keys_file, t, "admin", t) for t in ("limited", "free", "tokens", "queue", "racing")}
    keys_file.write_text(keys_file.read_text() + (
        "tenants:\n"
        "  limited:\n    quotas: {adapters: 2, pinned: 1, requests: 2, merges: 1}\n"
        "  racing:\n    quotas: {adapters: 3, pinned: 1}\n"
        "  tokens:\n    quotas: {tokens_per_minute: 40}\n"
        "  queue:\n    quotas: {queued: 1}\n"
    ))
    server = BackgroundServer(assets.settings(auth="keys", auth_keys_file=keys_file, merge_root=root / "merged", adapter_slots=4))
    yield server, keys
    server.stop()


def refused(fn, quota: str, tenant: str):
    with pytest.raises(lc.ResourceExhausted) as e:
        fn()
    error = e.value
    assert error.reason == "QUOTA_EXCEEDED" and error.metadata["quota"] == quota and error.metadata["tenant"] == tenant
    assert len(error.quota_violations) == 1 and error.quota_violations[0][0] == f"tenant:{tenant}"
    assert f"its quota {quota} is {error.metadata['limit']}" in error.quota_violations[0][1]
    return error


def test_registered_and_pinned_adapters(quota_server):
    server, keys = quota_server
    with lc.Client(server.target, api_key=keys["limited"]) as q, lc.Client(server.target, api_key=keys["free"]) as free:
        q.load_adapter("one", source="qv-r4", pin=True)
        error = refused(lambda: q.load_adapter("two", source="mlp-r2", pin=True), "pinned", "limited")
        assert error.metadata["limit"] == "1" and error.metadata["used"] == "1" and error.retry_after is None
        assert [a.adapter_id for a in q.list_adapters()] == ["one"]  # the refused load left nothing
        q.load_adapter("two", source="mlp-r2")
        error = refused(lambda: q.load_adapter("three", source="pattern"), "adapters", "limited")
        assert (error.metadata["limit"], error.metadata["used"]) == ("2", "2")
        q.load_adapter("two", source="pattern", replace=True)  # replacing one of its own stays within the quota
        for name in ("a", "b", "c"):  # another tenant is not limited
            free.load_adapter(name, source="qv-r4")
        q.unload_adapter("two")
        q.load_adapter("three", source="pattern")  # room again


def test_concurrent_loads_cannot_overshoot_together(quota_server):
    """Loads in flight count against the quota: six at once for a quota of three register exactly
    three (the checks all come before any file is read, so without that all six would pass),
    and of four pins at once for a quota of one exactly one is pinned."""
    server, keys = quota_server
    sources = ["qv-r4", "pattern", "mlp-r2", "rslora-r8", "all-r16", "qv-r4"]

    def race(count, load):
        barrier, outcomes = threading.Barrier(count), [None] * count

        def run(i):
            with lc.Client(server.target, api_key=keys["racing"]) as c:
                barrier.wait()
                try:
                    load(c, i)
                    outcomes[i] = "OK"
                except lc.ResourceExhausted as e:
                    assert e.reason == "QUOTA_EXCEEDED" and e.metadata["tenant"] == "racing"
                    outcomes[i] = e.metadata["quota"]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return outcomes

    with lc.Client(server.target, api_key=keys["racing"]) as c:
        outcomes = race(6, lambda client, i: client.load_adapter(f"r{i}", source=sources[i]))
        assert sorted(outcomes) == ["OK"] * 3 + ["adapters"] * 3, outcomes
        loaded = sorted(a.adapter_id for a in c.list_adapters())
        assert loaded == sorted(f"r{i}" for i, o in enumerate(outcomes) if o == "OK")
        for name in loaded:
            c.unload_adapter(name)
        outcomes = race(4, lambda client, i: client.load_adapter(f"p{i}", source=sources[i], pin=True))
        assert sorted(outcomes) == ["OK"] + ["pinned"] * 3, outcomes
        assert [(a.adapter_id, a.pinned) for a in c.list_adapters()] == [(f"p{outcomes.index('OK')}", True)]
        c.unload_adapter(f"p{outcomes.index('OK')}")


def test_requests_in_flight_queued_and_merges_at_once(quota_server):
    server, keys = quota_server
    engine = server.engine
    gate, entered = threading.Event(), threading.Event()
    engine.call_on_engine(lambda: (entered.set(), gate.wait(60)))  # hold the engine: requests stay queued
    assert entered.wait(10)
    results = []

    def call(client):
        results.append(client.generate(prompt=PROMPTS[0], max_new_tokens=2).token_ids)

    wait_for = eventually

    try:
        with lc.Client(server.target, api_key=keys["limited"]) as q, lc.Client(server.target, api_key=keys["free"]) as free, \
                lc.Client(server.target, api_key=keys["queue"]) as queue_client:
            threads = [threading.Thread(target=call, args=(q,)) for _ in range(2)]
            for t in threads:
                t.start()
            wait_for(lambda: engine.usage.in_flight("limited") == 2)
            error = refused(lambda: q.generate(prompt=PROMPTS[0], max_new_tokens=2), "requests", "limited")
            assert error.metadata["limit"] == "2" and error.retry_after > 0
            threads.append(threading.Thread(target=call, args=(free,)))  # the other tenant is accepted meanwhile
            threads[-1].start()
            wait_for(lambda: engine.usage.in_flight("free") == 1)
            threads.append(threading.Thread(target=call, args=(queue_client,)))  # one may wait, not two
            threads[-1].start()
            wait_for(lambda: engine.stats().waiting_by_tenant.get("queue", 0) == 1)
            error = refused(lambda: queue_client.generate(prompt=PROMPTS[0], max_new_tokens=2), "queued", "queue")
            assert (error.metadata["limit"], error.metadata["used"]) == ("1", "1") and error.retry_after > 0

            # Merges: the merge thread is held too, so the first merge stays queued.
            merge_gate = threading.Event()
            engine.merges._executor.submit(merge_gate.wait, 60)
            try:
                first = q.merge("one", "m1")
                refused(lambda: q.merge("one", "m2"), "merges", "limited")
                free.load_adapter("fm", source="qv-r4")
                free.merge("fm", "m1")  # another tenant's merge is accepted
            finally:
                merge_gate.set()
            first.result(timeout=60)
            q.merge("one", "m2").result(timeout=60)  # room again once the first is done
            gate.set()
            for t in threads:  # the held requests now run, on the clients still open
                t.join(60)
    finally:
        gate.set()
    assert len(results) == 4 and engine.usage.in_flight("limited") == 0


def test_tokens_per_minute(quota_server):
    server, keys = quota_server
    with lc.Client(server.target, api_key=keys["tokens"]) as t, lc.Client(server.target, api_key=keys["free"]) as free:
        prompt = [5, 6, 7, 8]
        t.generate(prompt_token_ids=prompt, max_new_tokens=30)  # 34 of 40 tokens this minute
        error = refused(lambda: t.generate(prompt_token_ids=prompt, max_new_tokens=30), "tokens_per_minute", "tokens")
        assert (error.metadata["limit"], error.metadata["used"]) == ("40", "34")
        assert 50 < error.retry_after <= 60  # when the first request's tokens leave the window
        t.generate(prompt_token_ids=prompt, max_new_tokens=2)  # 6 more still fit
        alone = refused(lambda: t.generate(prompt_token_ids=prompt, max_new_tokens=50), "tokens_per_minute", "tokens")
        assert alone.retry_after is None and "a request that may use 54 tokens" in alone.message  # waiting cannot help
        free.generate(prompt_token_ids=prompt, max_new_tokens=30)


def test_sources_are_confined_per_tenant(assets, tmp_path):
    import shutil

    root = tmp_path / "adapters"
    for area in ("boxed", "other"):
        shutil.copytree(assets.adapters / "qv-r4", root / area / "qv")
    (root / "boxed" / "sneaky").symlink_to(root / "other" / "qv")
    keys_file = tmp_path / "keys.yaml"
    boxed, free = append_key(keys_file, "boxed", "admin"), append_key(keys_file, "free", "admin")
    keys_file.write_text(keys_file.read_text() + "tenants:\n  boxed:\n    sources: {roots: [boxed], hub: [acme]}\n")
    settings = assets.settings(auth="keys", auth_keys_file=keys_file, adapter_roots=(root,))
    with BackgroundServer(settings) as server, lc.Client(server.target, api_key=boxed) as b, \
            lc.Client(server.target, api_key=free) as f:
        assert b.load_adapter("mine", source="qv").rank == 4  # relative sources resolve in the tenant's own directory
        for source, cls, reason in (
            ("../other/qv", lc.InvalidArgument, "SOURCE_OUTSIDE_ROOT"),
            (str(root / "other" / "qv"), lc.InvalidArgument, "SOURCE_OUTSIDE_ROOT"),
            ("sneaky", lc.InvalidArgument, "SOURCE_OUTSIDE_ROOT"),  # a link out of its directory
            ("other/qv", lc.NotFound, "SOURCE_NOT_FOUND"),  # <root>/boxed/other/qv
            ("hf://someone/adapter", lc.InvalidArgument, "SOURCE_NOT_ALLOWED"),
        ):
            with pytest.raises(cls) as e:
                b.load_adapter("x", source=source)
            assert e.value.reason == reason, source
        assert [a.adapter_id for a in b.list_adapters()] == ["mine"]
        assert f.load_adapter("theirs", source="other/qv").rank == 4  # a tenant without sources: the server's roots


def test_merge_outputs_are_bounded_per_tenant_and_by_the_disk(assets, tmp_path):
    """Outputs kept count against merge_outputs (the keys file's, else the server's default)
    and merge_output_gib; an overwrite replaces its output without counting twice; a merge
    that would leave the disk under --merge-disk-reserve-mib is refused, retriable, before
    any operation exists."""
    keys_file = tmp_path / "keys.yaml"
    keys = {t: append_key(keys_file, t, "admin", t) for t in ("two", "defaulted", "bytes")}
    keys_file.write_text(keys_file.read_text() + (
        "tenants:\n  two:\n    quotas: {merge_outputs: 2}\n  bytes:\n    quotas: {merge_output_gib: 0}\n"))
    settings = assets.settings(auth="keys", auth_keys_file=keys_file, merge_root=tmp_path / "merged",
                               tenant_max_merge_outputs=1)
    with BackgroundServer(settings) as server:
        clients = {t: lc.Client(server.target, api_key=k, timeout=60) for t, k in keys.items()}
        try:
            for client in clients.values():
                client.load_adapter("qv", source="qv-r4")
            two = clients["two"]
            two.merge("qv", "a").result(timeout=60)
            two.merge("qv", "b").result(timeout=60)
            error = refused(lambda: two.merge("qv", "c"), "merge_outputs", "two")
            assert (error.metadata["limit"], error.metadata["used"]) == ("2", "2") and error.retry_after is None
            two.merge("qv", "b", overwrite=True).result(timeout=60)  # replacing one of its own outputs
            for nested in ("a/inside", "/".join("d" * 9)):  # inside an output (uncounted), or too deep to count
                with pytest.raises(lc.InvalidArgument) as e:
                    two.merge("qv", nested)
                assert e.value.reason == "OUTPUT_DIR_INVALID"
            clients["defaulted"].merge("qv", "only").result(timeout=60)  # the server's default: 1
            refused(lambda: clients["defaulted"].merge("qv", "second"), "merge_outputs", "defaulted")
            refused(lambda: clients["bytes"].merge("qv", "any"), "merge_output_gib", "bytes")
            assert not (tmp_path / "merged" / "bytes" / "any").exists()
            assert [op.name for op in server.engine.operations.list("bytes")] == []
        finally:
            for client in clients.values():
                client.close()
    full = assets.settings(merge_root=tmp_path / "merged-full", merge_disk_reserve_mib=1 << 40)
    with BackgroundServer(full) as server, lc.Client(server.target, timeout=60) as client:
        client.load_adapter("qv", source="qv-r4")
        with pytest.raises(lc.ResourceExhausted) as e:
            client.merge("qv", "out")
        assert e.value.reason == "MERGE_DISK_FULL" and e.value.retry_after == 60.0
        assert int(e.value.metadata["needed_mib"]) >= 0 and server.engine.operations.list("default") == []
