"""The GPU run's tools stay runnable between GPU sessions (issue 22): a device machine is lent
rarely and briefly, so what it runs is checked here, where it can be: the decode-step script's
every eager part on the CPU (Triton kernels under the interpreter), and the wheels it carries
covering what the server needs beside what the machine's image holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "scripts" / "gpu"


def test_the_step_script_measures_every_eager_part_on_the_cpu(tmp_path):
    out = tmp_path / "step.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, str(GPU / "step.py"), "--device", "cpu", "--dtype", "float32", "--hidden", "64",
         "--intermediate", "172", "--heads", "4", "--layers", "1", "--kv", "16", "--rows", "2", "--reps", "1",
         "--rounds", "1", "--prefill-rows", "2", "--prefill-tokens", "4", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == []
    (cell,) = result["cells"]
    assert cell["rows"] == 2
    # Everything but the CUDA graphs (which need CUDA) was measured.
    assert set(cell["steps"]) == {"plain eager", "base eager", "mixed torch eager", "plain eager (triton group)",
                                  "base eager (triton group)", "mixed triton eager",
                                  "mixed triton eager, no shared shrinks"}
    assert all(step["ms"] > 0 for step in cell["steps"].values())
    assert set(cell["ratios"]) == {"base eager / plain eager", "mixed torch eager / base eager",
                                   "mixed triton eager / base eager", "shared shrinks / alone"}
    assert cell["bytes"]["base"] == result["weight_bytes"] > 0 and cell["bytes"]["adapters"] > 0
    prefill = result["prefill"]
    assert set(prefill["steps"]) == {"plain prefill", "base prefill", "mixed torch prefill",
                                     "base prefill (triton group)", "mixed triton prefill"}
    # The Triton prefill's logits against the torch path's (float32 here).
    assert prefill["triton_vs_torch_max_logit_diff"] < 1e-4


def _names(path: Path) -> dict[str, str | None]:
    """A list of `name` or `name==version` lines (comments skipped) -> {canonical name: version}."""
    names = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            names[canonicalize_name(name)] = version or None
    return names


def test_the_carried_wheels_and_the_gpu_image_hold_everything_the_server_needs():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import constraints
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = constraints.closure([Requirement(r) for r in project["dependencies"]
                                  + project["optional-dependencies"]["server"]])
    wheels = _names(GPU / "wheels.txt")
    image = _names(GPU / "image-packages.txt")
    assert sorted(set(needed) - set(wheels) - set(image)) == []
    # What is carried is what the suite passes with (docker/constraints.txt), one version each.
    pins = _names(ROOT / "docker" / "constraints.txt")
    assert all(version for version in wheels.values())
    assert {n: v for n, v in wheels.items() if n in pins and pins[n] != v} == {}
    # The packages loramux imports directly and the image holds too old are carried: the server's
    # stack as the first GPU run found it missing or too old (docs/benchmarks.md, "On a GPU").
    assert {"transformers", "peft", "tokenizers", "huggingface-hub", "protobuf", "grpcio", "llguidance",
            "opentelemetry-sdk", "starlette", "uvicorn", "pydantic"} <= set(wheels)
