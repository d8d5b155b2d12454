"""Adapter-affinity routing over three replicas on loopback, with gRPC's own ring_hash: every
adapter's requests land on one replica, adapters spread across replicas, and stopping a
replica moves only its adapters while calls keep succeeding."""

import pytest

import loramux.client as lc
from conftest import PROMPTS
from loramux.server.app import BackgroundServer

NAMES = [f"a{i:02d}" for i in range(12)]


@pytest.fixture()
def replicas(assets, tmp_path):
    """Three replicas sharing one state directory: adapters registered on one are served by all."""
    servers = [BackgroundServer(assets.settings(state_dir=tmp_path / "state", replica_id=f"r{i}")) for i in range(3)]
    for name in NAMES:
        servers[0].engine.load_adapter("default", name, "qv-r4")
    yield servers
    for server in servers:
        if not server.running.stopped:
            server.stop()


def uses(servers, name):
    """Each replica's count of requests that used `name` (counted when a row is released, after
    its answer went out: wait for each live engine to be between passes first)."""
    for server in servers:
        if not server.running.stopped:
            server.engine.call_on_engine(lambda: None).result(60)
    return [s.engine.registry.get("default", name).use_count if s.engine.registry.has("default", name) else 0
            for s in servers]


def placement(servers, client, rounds=2):
    for name in NAMES:
        for _ in range(rounds):
            client.generate(adapter_id=name, prompt=PROMPTS[0], max_new_tokens=2)
    where = {}
    for name in NAMES:
        counts = uses(servers, name)
        assert sorted(counts)[:-1] == [0] * (len(servers) - 1), (name, counts)  # one replica only
        where[name] = counts.index(max(counts))
    return where


def test_each_adapter_lands_on_one_replica_and_a_lost_replica_moves_only_its_own(replicas):
    target = "ipv4:" + ",".join(s.target for s in replicas)
    with lc.Client(target, timeout=60) as client:
        where = placement(replicas, client)
        assert len(set(where.values())) >= 2  # 12 adapters spread over the replicas
        for _ in range(6):  # base-model requests carry a random key: spread, never refused
            client.generate(prompt=PROMPTS[0], max_new_tokens=2)

        gone = where[NAMES[0]]
        replicas[gone].stop()
        before = {name: uses(replicas, name) for name in NAMES}
        for name in NAMES:
            client.generate(adapter_id=name, prompt=PROMPTS[0], max_new_tokens=2)  # retried elsewhere if needed
        for name in NAMES:
            grew = [i for i, (a, b) in enumerate(zip(before[name], uses(replicas, name))) if b > a]
            if where[name] == gone:
                assert grew and grew[0] != gone  # moved to a live replica
            else:
                assert grew == [where[name]], name  # the others stay where they were


def test_affinity_is_off_with_one_flag_and_for_plain_targets(replicas):
    target = "ipv4:" + ",".join(s.target for s in replicas)
    with lc.Client(target, timeout=60, affinity=False) as client:  # gRPC's default: the first address
        for name in NAMES[:4]:
            client.generate(adapter_id=name, prompt=PROMPTS[0], max_new_tokens=2)
    assert [sum(uses(replicas[i:i + 1], n)[0] for n in NAMES[:4]) for i in range(3)] == [4, 0, 0]
    from loramux.client._routing import wants_affinity

    assert wants_affinity("dns:///loramux-headless:50051") and wants_affinity(target)
    assert not wants_affinity("127.0.0.1:50051") and not wants_affinity("loramux:50051")


def test_the_async_client_routes_the_same_way(replicas):
    import asyncio

    target = "ipv4:" + ",".join(s.target for s in replicas)
    with lc.Client(target, timeout=60) as client:
        where = placement(replicas, client, rounds=1)

    async def main():
        async with lc.AsyncClient(target, timeout=60) as client:
            for name in NAMES:
                await client.generate(adapter_id=name, prompt=PROMPTS[0], max_new_tokens=2)

    before = {name: uses(replicas, name) for name in NAMES}
    asyncio.run(main())
    for name in NAMES:  # same key, same ring: the async client picks the same replica
        grew = [i for i, (a, b) in enumerate(zip(before[name], uses(replicas, name))) if b > a]
        assert grew == [where[name]], name


def test_servers_recycle_connections_so_clients_see_new_replicas(assets):
    from loramux.server.app import connection_age_options

    assert connection_age_options(assets.settings(max_connection_age_s=2.5)) == [
        ("grpc.max_connection_age_ms", 2500), ("grpc.max_connection_age_grace_ms", 60_000)]
    assert connection_age_options(assets.settings(max_connection_age_s=0)) == []


def test_a_merges_progress_and_result_go_to_the_replica_that_runs_it(assets, tmp_path):
    servers = [BackgroundServer(assets.settings(merge_root=tmp_path / f"m{i}")) for i in range(3)]
    try:
        for server in servers:
            for name in NAMES[:6]:
                server.engine.load_adapter("default", name, "qv-r4")
        target = "ipv4:" + ",".join(s.target for s in servers)
        with lc.Client(target, timeout=60) as client:
            for name in NAMES[:6]:  # each merge's operation lives on one replica only
                handle = client.merge(name, f"out-{name}")
                assert handle.progress().operation == handle.name
                assert handle.result(timeout=60).merged_tensors > 0
        written = [sorted(p.name for p in (tmp_path / f"m{i}" / "default").glob("out-*")) for i in range(3)
                   if (tmp_path / f"m{i}" / "default").exists()]
        assert sorted(n for names in written for n in names) == sorted(f"out-{n}" for n in NAMES[:6])
    finally:
        for server in servers:
            server.stop()


def test_the_router_remembers_a_bounded_number_of_merge_operations():
    """A long-lived client routes calls about its latest merges to the merge's replica; it does
    not keep every operation name it ever saw."""
    from loramux.client._routing import AFFINITY_HEADER, MAX_OPERATIONS, AffinityRouter
    from google.longrunning import operations_pb2

    router = AffinityRouter("key")
    for i in range(MAX_OPERATIONS + 10):
        router.remember(f"operations/{i}", f"adapter-{i % 3}")
    router.remember("operations/10", "adapter-1")  # used again: kept as recent
    for i in range(11):
        router.remember(f"operations/new-{i}", "adapter-2")
    assert len(router._operations) == MAX_OPERATIONS

    def routed(name):
        key, value = router.header_for(operations_pb2.GetOperationRequest(name=name))
        assert key == AFFINITY_HEADER
        return value.split("/", 1)[1] if "/" in value else None

    assert routed("operations/10") == "adapter-1" and routed(f"operations/{MAX_OPERATIONS + 9}") == f"adapter-{(MAX_OPERATIONS + 9) % 3}"
    assert routed("operations/11") is None  # the oldest were let go: any replica answers for them
