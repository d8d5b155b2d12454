"""The server's imports run one way, as docs/architecture.md draws them: a part may import the
parts below it, never one above it, and there is no circle. Read from the source with an ast
walk (imports inside functions count too: a late import is still a dependency).

Each part of `loramux.server` (a package, or a top-level module) has a floor; telemetry
stands beside the chain and imports only the shared vocabulary. A front door reaches the
engine through its facade alone (`engine/facade.py`), and below it only the tenancy it
authenticates with and the shared vocabulary."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "service" / "loramux" / "server"

# Floors, ground first. A part may import parts on lower floors only.
FLOORS = [
    {"errors"},
    {"settings", "names"},
    {"tiers", "cpu_threads", "hub"},  # shared vocabulary and helpers
    {"lora"},  # the ground floor of the model: slot layers, the slot bank, adapter weights
    {"store", "tenancy"},  # the shared store; keys, quotas and source allowances
    {"adapters"},  # sources, checkpoints, the registry, the tiered cache
    {"model", "merging"},  # the served base model; merging into its files
    {"telemetry"},
    {"engine"},
    {"engine_process"},  # --engine-process: the engine served from its own process, and the facade that calls it
    {"front_door"},  # what the front doors share: per-tenant pools for blocking engine calls
    {"grpc_api", "http_api"},  # the gRPC front door; the OpenAI-compatible HTTP one
    {"app"},  # building and running the server
    {"serve_command"},  # `loramux serve`
]
# Telemetry is fed plain data: it may import only these, whatever floor they are on.
TELEMETRY_MAY_IMPORT = {"errors", "settings", "tiers"}
# What a front door may import of the server: the engine's facade, the tenancy it authenticates
# with, the shared vocabulary.
FRONT_DOORS = {"grpc_api", "http_api"}
FRONT_DOOR_MAY_IMPORT = {"engine.facade", "front_door", "tenancy", "errors", "settings", "names", "tiers", "cpu_threads"}


def _part(module: str) -> str | None:
    """The part of loramux.server a module belongs to (None: outside the server)."""
    parts = module.split(".")
    if parts[:2] != ["loramux", "server"] or len(parts) < 3:
        return None
    return parts[2]


def imports() -> set[tuple[str, str, str, str]]:
    """(importing part, imported part, imported module, file) for every import between two parts."""
    found = set()
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        here = relative.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] if node.module != "loramux.server" else [f"loramux.server.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                there = _part(name)
                if there is not None and there != here:
                    found.add((here, there, name.removeprefix("loramux.server."), str(relative)))
    return found


def test_every_part_has_a_floor():
    parts = {p.name.removesuffix(".py") for p in ROOT.iterdir() if p.name != "__init__.py" and
             (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    placed = set().union(*FLOORS)
    assert parts == placed, f"place these in FLOORS (and docs/architecture.md): {sorted(parts ^ placed)}"


def test_imports_point_down_only():
    floor = {part: i for i, parts in enumerate(FLOORS) for part in parts}
    wrong = []
    for here, there, module, where in sorted(imports()):
        if here == "telemetry":
            if there not in TELEMETRY_MAY_IMPORT:
                wrong.append(f"{where} imports {module} (telemetry is fed plain data)")
        elif here in FRONT_DOORS:
            if module not in FRONT_DOOR_MAY_IMPORT and there not in FRONT_DOOR_MAY_IMPORT:
                wrong.append(f"{where} imports {module} (a front door calls the engine's facade)")
        elif floor[there] >= floor[here]:
            wrong.append(f"{where} imports {module} (floor {floor[there]} from floor {floor[here]})")
    assert wrong == []
