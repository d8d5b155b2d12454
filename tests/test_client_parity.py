"""The blocking and asyncio clients behave alike: the same methods with the same parameters,
and, against one server with API keys, the same answers and the same typed errors, whether
they made their channel or were given one (AsyncClient(channel=..., api_key=...) once sent no
key while Client did)."""

from __future__ import annotations

import asyncio
import inspect

import grpc
import pytest

import loramux.client as lc
from conftest import PROMPTS
from loramux.server.app import BackgroundServer
from loramux.server.tenancy.keys import append_key

N = 4


def _public(cls) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in inspect.getmembers(cls)
            if not name.startswith("_") and callable(member)}


def test_both_clients_offer_the_same_methods_and_parameters():
    sync, aio = _public(lc.Client), _public(lc.AsyncClient)
    assert sorted(sync) == sorted(aio)
    for name in sync:
        assert list(sync[name].parameters) == list(aio[name].parameters), name
        for param in sync[name].parameters:
            assert sync[name].parameters[param].default == aio[name].parameters[param].default, (name, param)


@pytest.fixture(scope="module")
def keyed(assets, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("parity") / "keys.yaml"
    key = append_key(keys_file, "team", "admin", "team")
    with BackgroundServer(assets.settings(auth="keys", auth_keys_file=keys_file)) as server:
        with lc.Client(server.target, api_key=key) as client:
            client.load_adapter("qv", source="qv-r4")
        yield server, key


def _sync_outcomes(client: lc.Client) -> list:
    out = [client.generate(prompt=PROMPTS[1], adapter_id="qv", max_new_tokens=N).token_ids,
           [c.token_ids for c in client.generate_stream(prompt=PROMPTS[1], adapter_id="qv", max_new_tokens=N)],
           [a.adapter_id for a in client.list_adapters()], client.get_adapter("qv").rank]
    for call in (lambda: client.get_adapter("missing"), lambda: client.generate(prompt="x", temperature=-1)):
        try:
            call()
        except lc.LoramuxError as e:
            out.append((type(e).__name__, e.reason))
    return out


async def _aio_outcomes(client: lc.AsyncClient) -> list:
    out = [(await client.generate(prompt=PROMPTS[1], adapter_id="qv", max_new_tokens=N)).token_ids,
           [c.token_ids async for c in client.generate_stream(prompt=PROMPTS[1], adapter_id="qv", max_new_tokens=N)],
           [a.adapter_id for a in await client.list_adapters()], (await client.get_adapter("qv")).rank]
    for call in (lambda: client.get_adapter("missing"), lambda: client.generate(prompt="x", temperature=-1)):
        try:
            await call()
        except lc.LoramuxError as e:
            out.append((type(e).__name__, e.reason))
    return out


def test_both_clients_answer_alike_with_a_channel_of_their_own_or_given(assets, keyed):
    server, key = keyed
    want = assets.oracle("qv-r4", PROMPTS[1], N)
    # The stream's last chunk carries the finish reason alone.
    expected = [want, [[t] for t in want] + [[]], ["qv"], 4, ("NotFound", "ADAPTER_NOT_FOUND"),
                ("InvalidArgument", "INVALID_SAMPLING_PARAMETER")]
    with lc.Client(server.target, api_key=key) as made:
        assert _sync_outcomes(made) == expected
    with grpc.insecure_channel(server.target) as channel:
        assert _sync_outcomes(lc.Client(server.target, channel=channel, api_key=key)) == expected

    async def run_aio() -> list:
        async with lc.AsyncClient(server.target, api_key=key) as made:
            first = await _aio_outcomes(made)
        async with grpc.aio.insecure_channel(server.target) as channel:
            given = await _aio_outcomes(lc.AsyncClient(server.target, channel=channel, api_key=key))
        return [first, given]

    assert asyncio.run(run_aio()) == [expected, expected]
    with grpc.insecure_channel(server.target) as channel:  # and without the key, both are refused alike
        with pytest.raises(lc.Unauthenticated):
            lc.Client(server.target, channel=channel).list_adapters()
