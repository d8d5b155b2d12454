"""Write docker/constraints.txt: the exact versions of everything `pip install '.[all]'`
installs, as this environment holds them (the versions the suite passed with), so that an
image built later installs the same. Run after `make install`:

    python scripts/constraints.py            # rewrite docker/constraints.txt
    python scripts/constraints.py --check    # exit 1 if a pin no longer satisfies pyproject.toml

The closure is read from the installed distributions' metadata (their Requires-Dist, extras
and environment markers as this platform evaluates them); torch and its CUDA libraries are
left out: the images install torch from PyTorch's own index for their platform.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docker" / "constraints.txt"
EXTRAS = ("server", "quant", "s3")
LEFT_OUT = ("torch", "triton")  # installed from PyTorch's index, per platform (with nvidia-* on CUDA)


def top_level() -> list[Requirement]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in reqs if canonicalize_name(r.name) != "loramux"]


def closure(reqs: list[Requirement]) -> dict[str, str]:
    env = default_environment()
    pinned: dict[str, str] = {}
    todo = [(r, ()) for r in reqs]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if name in LEFT_OUT or name.startswith("nvidia-"):
            continue
        dist = metadata.distribution(req.name)
        first = name not in pinned
        pinned[name] = dist.version
        wanted = set(req.extras)
        for raw in dist.requires or []:
            sub = Requirement(raw)
            markers = [dict(env, extra=e) for e in (wanted or {""})]
            if sub.marker is None or any(sub.marker.evaluate(m) for m in markers):
                if first or sub.extras:
                    todo.append((sub, ()))
    return pinned


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if args.check:
        pins = {}
        for line in OUT.read_text().splitlines():
            if line and not line.startswith("#"):
                name, version = line.split("==")
                pins[canonicalize_name(name)] = version
        bad = [f"{r} (pinned {pins.get(canonicalize_name(r.name))})" for r in top_level()
               if canonicalize_name(r.name) not in LEFT_OUT
               and (canonicalize_name(r.name) not in pins or pins[canonicalize_name(r.name)] not in r.specifier)]
        if bad:
            print("docker/constraints.txt does not satisfy pyproject.toml: " + "; ".join(bad), file=sys.stderr)
            return 1
        return 0
    pinned = closure(top_level())
    header = ("# Exact versions for the images (pip install -c docker/constraints.txt '.[all]'), as the suite\n"
              "# passed with them; written by scripts/constraints.py (torch comes from PyTorch's index).\n")
    OUT.write_text(header + "".join(f"{name}=={version}\n" for name, version in sorted(pinned.items())))
    print(f"{len(pinned)} pins written to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
