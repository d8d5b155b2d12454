"""Generate the Python code for proto/loramux/v1 into a directory (default: client/).

Used by `make proto` and by the test that checks the committed code is up to date.
The generated files are byte-for-byte repeatable for a fixed grpcio-tools/mypy-protobuf.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import google.api
import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def _googleapis_include(into: Path) -> None:
    """Lay out googleapis-common-protos' .proto files under the names other protos import.

    The package ships google/longrunning/operations.proto as operations_proto.proto.
    """
    google_pkg = Path(next(iter(google.api.__path__))).parent
    for sub in ("api", "rpc", "longrunning"):
        for src in (google_pkg / sub).glob("*.proto"):
            name = "operations.proto" if src.name == "operations_proto.proto" else src.name
            dst = into / "google" / sub / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.glob("loramux/v1/*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent  # protoc-gen-mypy lives beside the interpreter
    env_path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{env_path}"
    with tempfile.TemporaryDirectory() as tmp:
        include = Path(tmp)
        _googleapis_include(include)
        well_known = Path(next(iter(grpc_tools.__path__))) / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--mypy_out={out_dir}",
            f"--mypy_grpc_out={out_dir}",
            *[str(p.relative_to(PROTO_ROOT)) for p in protos],
        ]
        rc = protoc.main(args)
    os.environ["PATH"] = env_path
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    pkg = out_dir / "loramux" / "v1"
    (pkg / "__init__.py").write_text('"""Generated protobuf and gRPC code for loramux.v1 (make proto)."""\n')
    return sorted(p for p in pkg.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "client")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))


if __name__ == "__main__":
    main()
