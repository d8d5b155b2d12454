"""Shared fixtures: a tiny real Llama, a trained-on-nothing tokenizer, real peft adapters,
and the peft oracle (PeftModel.generate, greedy, fp32) to compare against."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's kernels (lora/triton_kernels.py) run on the CPU under its interpreter. It must be
    # on before anything imports Triton: Triton's own library functions are made for the mode
    # of that moment. (On a GPU machine, scripts/gpu/test_cuda.py imports this file too.)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from loramux.demo.assets import build_model, build_tokenizer, make_adapter
from loramux.server.model.base_model import load_base_model
from loramux.server.settings import Settings

TEXTS = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}, said Ada." for i in range(300)]
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name -> make_adapter kwargs: different ranks, alphas, rslora, patterns and target subsets.
ADAPTERS = {
    "qv-r4": dict(r=4, alpha=16, target_modules=("q_proj", "v_proj"), seed=1),
    "rslora-r8": dict(r=8, alpha=8, use_rslora=True, target_modules=("k_proj", "o_proj", "gate_proj", "up_proj"), seed=2),
    "pattern": dict(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"),
                    rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}, seed=3),
    "all-r16": dict(r=16, alpha=32, target_modules=ALL, seed=4, std=0.1),
    "mlp-r2": dict(r=2, alpha=4, target_modules=("gate_proj", "up_proj", "down_proj"), seed=5),
}
PROMPTS = ["the quick brown", "lazy dog number 21, said", "fox", "over the lazy dog number 14 jumps the quick brown fox"]


class Assets:
    def __init__(self, root: Path):
        self.root = root
        self.base = root / "base"
        self.adapters = root / "adapters"
        self.tokenizer = build_tokenizer(root / "tok", TEXTS, vocab_size=400)
        build_model(self.base, self.tokenizer, seed=0, init_std=0.1)
        for name, kwargs in ADAPTERS.items():
            make_adapter(self.base, self.adapters / name, **kwargs)

    def settings(self, **overrides) -> Settings:
        values = dict(model=str(self.base), adapter_roots=(self.adapters,), max_lora_rank=16, adapter_slots=4, auth="none")
        values.update(overrides)
        return Settings(**values)

    def copy_adapter(self, name: str, new: str) -> Path:
        dst = self.adapters / new
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(self.adapters / name, dst)
        return dst

    @functools.lru_cache(maxsize=None)
    def peft_model(self, adapter: str | None):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(self.base), dtype=torch.float32).eval()
        if adapter:
            model = PeftModel.from_pretrained(model, str(self.adapters / adapter)).eval()
        return model

    @functools.lru_cache(maxsize=None)
    def oracle(self, adapter: str | None, prompt: str, max_new_tokens: int) -> list[int]:
        """Greedy tokens from peft's PeftModel.generate (or the plain base model)."""
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = self.peft_model(adapter).generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
            )
        return out[0, ids.shape[1]:].tolist()


def eventually(check, within: float = 30.0, retry_on: tuple[type[BaseException], ...] = (AssertionError,),
               interval: float = 0.01):
    """`check()`, again every `interval` until it returns something other than False without
    raising one of `retry_on`; its last error (or an AssertionError) once `within` seconds have
    passed. The suite's one way to wait for something another thread makes happen."""
    deadline = time.monotonic() + within
    while True:
        try:
            result = check()
            if result is not False:
                return result
        except retry_on:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within} s: {getattr(check, '__name__', check)}")
        time.sleep(interval)


def scrape(port: int) -> dict:
    """A Prometheus endpoint's samples: (name, labels without OpenTelemetry's scope) -> value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if not k.startswith("otel_scope_")))
            samples[(s.name, labels)] = s.value
    return samples


@contextlib.contextmanager
def loaded_client(target: str, names=ADAPTERS, timeout: float = 60):
    """A gRPC client of the server at `target`, with the suite's adapters `names` registered
    under their own names (their sources)."""
    import loramux.client as lc

    with lc.Client(target, timeout=timeout) as client:
        for name in names:
            client.load_adapter(name, source=name)
        yield client


def merged_path(server, result, tenant: str = "default") -> Path:
    """Where a merge result lies on the server's disk (results name it under the tenant's
    directory of the merge root only)."""
    return server.engine.settings.merge_root / tenant / result.output_path


@pytest.fixture(autouse=True)
def _root_log_handlers_restored():
    """A test that runs `loramux serve` installs its stderr handler on the root logger, bound
    to that test's captured stream; later tests' log lines would go to the closed stream (and
    "--- Logging error ---" to theirs). Whatever a test adds to the root logger goes with it."""
    import logging

    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    return Assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="session")
def base_model(assets):
    """One loaded base model with 4 slots (shared by the engine tests that don't reconfigure)."""
    return load_base_model(assets.settings())
