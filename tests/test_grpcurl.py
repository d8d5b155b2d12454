"""What a newcomer does: serve a local model folder, then load two adapters and generate
with each through grpcurl, which knows the API only from server reflection."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from loramux.server.app import BackgroundServer

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


def grpcurl(target, method, body=None):
    cmd = [GRPCURL, "-plaintext", "-max-time", "60"]
    if body is not None:
        cmd += ["-d", json.dumps(body)]
    out = subprocess.run([*cmd, target, method], capture_output=True, text=True, timeout=90)
    return out.returncode, out.stdout, out.stderr


def test_load_two_adapters_and_generate_with_grpcurl(assets):
    with BackgroundServer(assets.settings()) as srv:
        rc, out, err = grpcurl(srv.target, "list")
        assert rc == 0 and "loramux.v1.Loramux" in out.split(), err
        for name in ("qv-r4", "rslora-r8"):
            rc, out, err = grpcurl(srv.target, "loramux.v1.Loramux/LoadAdapter", {"adapter_id": name, "source": name})
            assert rc == 0, err
            assert json.loads(out)["tier"] == "TIER_HOST"
            rc, out, err = grpcurl(
                srv.target, "loramux.v1.Loramux/Generate", {"adapter_id": name, "prompt": "fox", "max_new_tokens": 6}
            )
            assert rc == 0, err
            reply = json.loads(out)
            ids = reply.get("tokenIds", reply.get("token_ids"))
            assert ids == assets.oracle(name, "fox", 6)
        rc, out, err = grpcurl(srv.target, "loramux.v1.Loramux/GetAdapter", {"adapter_id": "missing"})
        assert rc != 0 and "NotFound" in err
