"""The base model and adapters by Hub id and revision, through a Hub on loopback that speaks
the Hub's HTTP API (tests/hub_server.py): commits resolved and recorded, files cached, the
Hub's not-found and server errors as loramux's reasons, the cache alone with --hub-offline,
merges from the snapshot, and an adapter's recorded base revision checked."""

from __future__ import annotations

import json
import shutil

import pytest

import loramux.client as lc
from conftest import PROMPTS
from hub_server import LocalHub
from loramux.server.app import BackgroundServer
from loramux.server.errors import InvalidSettings

N = 6


@pytest.fixture(scope="module")
def hub(assets):
    hub = LocalHub()
    commits = {
        "base": hub.add("acme/base", assets.base),  # named like the adapters' recorded base ("base")
        "qv": hub.add("acme/qv", assets.adapters / "qv-r4", refs=("v1",)),
        "main": hub.add("acme/qv", assets.adapters / "pattern", refs=("main",)),  # a later commit on main
        "mlp": hub.add("acme/mlp", assets.adapters / "mlp-r2"),
    }
    yield hub, commits
    hub.close()


def test_base_and_adapters_come_from_the_hub_at_the_revisions_asked(assets, hub, tmp_path):
    hub, commits = hub
    settings = assets.settings(model="acme/base", hub_endpoint=hub.endpoint, hub_cache_dir=tmp_path / "cache",
                               merge_root=tmp_path / "merged")
    with BackgroundServer(settings) as server, lc.Client(server.target, timeout=60) as c:
        assert c.server_info().model_revision == commits["base"]
        assert c.load_adapter("qv", source="hf://acme/qv", revision="v1").revision == commits["qv"]
        assert c.load_adapter("latest", source="hf://acme/qv").revision == commits["main"]
        # Loading a name again: the same tag, or its commit, is the same registration; another commit is not.
        assert c.load_adapter("qv", source="hf://acme/qv", revision="v1").revision == commits["qv"]
        assert c.load_adapter("qv", source="hf://acme/qv", revision=commits["qv"]).revision == commits["qv"]
        with pytest.raises(lc.AlreadyExists):
            c.load_adapter("qv", source="hf://acme/qv", revision=commits["main"])
        assert c.generate(prompt=PROMPTS[1], adapter_id="qv", max_new_tokens=N).token_ids == \
            assets.oracle("qv-r4", PROMPTS[1], N)
        assert c.generate(prompt=PROMPTS[1], adapter_id="latest", max_new_tokens=N).token_ids == \
            assets.oracle("pattern", PROMPTS[1], N)
        # A merge reads the snapshot the server loaded: equal to merging the same files locally.
        out = tmp_path / "merged" / "default" / c.merge("qv", "merged").result(timeout=120).output_path
        from safetensors.torch import load_file

        from loramux.server.merging.base_files import read_base_checkpoint

        assert read_base_checkpoint(server.engine.base.directory).total_bytes == \
            read_base_checkpoint(assets.base).total_bytes
        assert server.engine.base.directory.name == commits["base"]
        assert load_file(f"{out}/model.safetensors").keys() == load_file(str(assets.base / "model.safetensors")).keys()

        for source, revision, cls, reason in [
            ("hf://acme/absent", "", lc.NotFound, "SOURCE_NOT_FOUND"),
            ("hf://acme/qv", "no-such-branch", lc.NotFound, "SOURCE_NOT_FOUND"),
            ("hf://not a repo id", "", lc.InvalidArgument, "SOURCE_INVALID"),
        ]:
            with pytest.raises(cls) as e:
                c.load_adapter("x", source=source, revision=revision)
            assert e.value.reason == reason, source
        hub.failures = 3  # the Hub has a bad moment: retriable, with a hint
        with pytest.raises(lc.Unavailable) as e:
            c.load_adapter("mlp", source="hf://acme/mlp")
        assert e.value.reason == "SOURCE_UNAVAILABLE" and e.value.retry_after is not None
        hub.failures = 0
        assert c.load_adapter("mlp", source="hf://acme/mlp").revision == commits["mlp"]
        assert any(r.startswith("GET /api/models/acme/mlp/revision/main") for r in hub.requests)


def test_a_hub_that_cannot_be_reached_is_unavailable_not_missing(assets, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = assets.settings(hub_endpoint=f"http://127.0.0.1:{port}", hub_cache_dir=tmp_path / "cache")
    with BackgroundServer(settings) as server, lc.Client(server.target, timeout=60) as c:
        with pytest.raises(lc.Unavailable) as e:
            c.load_adapter("x", source="hf://acme/qv")
        assert e.value.reason == "SOURCE_UNAVAILABLE" and e.value.retry_after is not None


def test_offline_serves_from_the_cache_alone(assets, hub, tmp_path):
    hub, commits = hub
    online = assets.settings(model="acme/base", hub_endpoint=hub.endpoint, hub_cache_dir=tmp_path / "cache")
    with BackgroundServer(online) as server, lc.Client(server.target, timeout=60) as c:
        c.load_adapter("qv", source="hf://acme/qv", revision="v1")
    seen = len(hub.requests)
    offline = assets.settings(model="acme/base", hub_endpoint=hub.endpoint, hub_cache_dir=tmp_path / "cache",
                              hub_offline=True)
    with BackgroundServer(offline) as server, lc.Client(server.target, timeout=60) as c:
        assert c.server_info().model_revision == commits["base"]
        assert c.load_adapter("qv", source="hf://acme/qv", revision="v1").revision == commits["qv"]
        with pytest.raises(lc.NotFound) as e:
            c.load_adapter("mlp", source="hf://acme/mlp")  # never fetched
        assert e.value.reason == "SOURCE_NOT_FOUND"
    assert len(hub.requests) == seen  # not one request went out
    with pytest.raises(InvalidSettings) as e:
        BackgroundServer(assets.settings(model="acme/never-fetched", hub_cache_dir=tmp_path / "cache", hub_offline=True))
    assert e.value.field == "model"


def test_an_adapter_trained_on_another_base_revision_is_refused(assets, hub, tmp_path):
    hub, commits = hub
    for trained_on, accepted in (("f" * 40, False), (commits["base"], True), ("main", True)):
        adapter = tmp_path / f"rev-{trained_on[:8]}"
        shutil.copytree(assets.adapters / "qv-r4", adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["revision"] = trained_on
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        hub.add(f"acme/{adapter.name}", adapter)
    settings = assets.settings(model="acme/base", hub_endpoint=hub.endpoint, hub_cache_dir=tmp_path / "cache")
    with BackgroundServer(settings) as server, lc.Client(server.target, timeout=60) as c:
        with pytest.raises(lc.FailedPrecondition) as e:
            c.load_adapter("old", source=f"hf://acme/rev-{'f' * 8}")
        assert e.value.reason == "ADAPTER_BASE_REVISION"
        assert c.load_adapter("same", source=f"hf://acme/rev-{commits['base'][:8]}").rank == 4
        assert c.load_adapter("branch", source="hf://acme/rev-main").rank == 4  # a branch name cannot be checked
    warn = assets.settings(model="acme/base", hub_endpoint=hub.endpoint, hub_cache_dir=tmp_path / "cache",
                           base_mismatch="warn")
    with BackgroundServer(warn) as server, lc.Client(server.target, timeout=60) as c:
        assert c.load_adapter("old", source=f"hf://acme/rev-{'f' * 8}").rank == 4


def test_an_adapter_repo_larger_than_any_adapter_is_refused_before_its_files_are_fetched(assets, hub, tmp_path):
    """A tenant naming a Hub repository whose weights file holds more than an adapter of
    max_lora_rank on every served module can: the sizes the Hub lists are checked first, and
    nothing is downloaded (the file here is sparse: its size costs no disk)."""
    hub, _ = hub
    huge = tmp_path / "huge"
    shutil.copytree(assets.adapters / "qv-r4", huge)
    with (huge / "adapter_model.safetensors").open("r+b") as f:
        f.truncate(64 << 20)  # above 4 x a max-rank adapter here, plus the 33 MiB of header and config allowed
    hub.add("acme/huge", huge)
    settings = assets.settings(hub_endpoint=hub.endpoint, hub_cache_dir=tmp_path / "cache")
    with BackgroundServer(settings) as server, lc.Client(server.target, timeout=60) as c:
        before = len(hub.requests)
        with pytest.raises(lc.InvalidArgument) as e:
            c.load_adapter("huge", source="hf://acme/huge")
        total = sum((huge / name).stat().st_size for name in ("adapter_config.json", "adapter_model.safetensors"))
        assert e.value.reason == "ADAPTER_TOO_LARGE" and f"hold {total} bytes" in e.value.message
        assert not any("resolve" in r and "acme/huge" in r for r in hub.requests[before:])  # no file was fetched
        assert not any((tmp_path / "cache").rglob("adapter_model.safetensors"))
        assert c.load_adapter("qv", source="hf://acme/qv", revision="v1").revision  # the usual path still fetches


def test_a_hub_adapter_brings_its_chat_template(assets, hub, tmp_path):
    hub, _ = hub
    templated = tmp_path / "templated"
    shutil.copytree(assets.adapters / "qv-r4", templated)
    (templated / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}", "model_max_length": 8}))
    hub.add("acme/templated", templated)
    settings = assets.settings(hub_endpoint=hub.endpoint, hub_cache_dir=tmp_path / "cache")
    with BackgroundServer(settings) as server, lc.Client(server.target, timeout=60) as c:
        c.load_adapter("t", source="hf://acme/templated")
        expected = assets.tokenizer("<<fox>>", add_special_tokens=False)["input_ids"]
        assert c.tokenize(messages=[("user", "fox")], adapter_id="t").token_ids == expected
