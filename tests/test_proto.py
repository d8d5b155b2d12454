"""The committed generated code is what `make proto` produces."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "loramux" / "v1").iterdir() if p.is_file()}
    committed = {p.name: p.read_bytes() for p in (ROOT / "client" / "loramux" / "v1").iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert stale == [], f"run `make proto`: {stale} differ from the protos"


def test_client_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from loramux.client import Client, AsyncClient, LoramuxError\n"
        "import loramux.cli.main\n"
        "assert 'loramux.server' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
