"""What `pip install` from this repository gets: a wheel and an sdist built here hold every
module of the source trees (a package missing from pyproject.toml's list once left the
images without the HTTP front door, while the editable install of the suite had it)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = {"client/loramux": "loramux", "service/loramux": "loramux"}


def sources() -> set[str]:
    """Every module of the two trees, as its path inside the installed `loramux` package."""
    found = set()
    for tree in TREES:
        base = ROOT / tree
        for path in base.rglob("*.py"):
            if "__pycache__" not in path.parts:
                found.add("loramux/" + path.relative_to(base).as_posix())
    return found


def build(kind: str, out: Path) -> Path:
    code = (f"from setuptools import build_meta; import sys; "
            f"print(build_meta.build_{kind}({str(out)!r}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def test_the_wheel_and_the_sdist_hold_every_module(tmp_path):
    wanted = sources()
    assert "loramux/server/http_api/routes.py" in wanted and "loramux/server/front_door/generation.py" in wanted
    wheel = build("wheel", tmp_path)
    in_wheel = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    assert wanted - in_wheel == set(), sorted(wanted - in_wheel)
    assert any(name.endswith(".dist-info/entry_points.txt") for name in zipfile.ZipFile(wheel).namelist())
    sdist = build("sdist", tmp_path)
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for tree in TREES:
        for path in (ROOT / tree).rglob("*.py"):
            if "__pycache__" not in path.parts:
                assert path.relative_to(ROOT).as_posix() in names, path
    assert {"pyproject.toml", "README.md"} <= names
