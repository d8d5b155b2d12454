"""`loramux demo` end to end: builds its assets, serves, merges and checks (exit code 0)."""

import subprocess
import sys


def test_demo_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "loramux.cli.main", "demo", "--cache-dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "equals the served adapter's tokens: True" in out.stdout
    assert "8. server stopped." in out.stdout
