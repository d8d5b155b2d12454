"""README.md's commands, run as written (with only their placeholders filled in: the model,
directories, port and keys), so that they cannot drift from the code: the keys and serve
commands start a real server, then the grpcurl, Python client and CLI examples run against
it in the order a newcomer would follow them."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def blocks(text: str) -> list[tuple[str, str]]:
    """The README's fenced code blocks: (language, code)."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def under(heading: str, text: str) -> list[tuple[str, str]]:
    """The code blocks of the section `heading` (to the next heading of its level or above)."""
    start = text.index(heading)
    level = heading.split(" ")[0]
    rest = text[start + len(heading):]
    end = re.search(rf"^#{{1,{len(level)}}} ", rest, flags=re.M)
    return blocks(rest[: end.start()] if end else rest)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_runs_as_written(assets, tmp_path):
    readme = (ROOT / "README.md").read_text()
    port = free_port()
    work = tmp_path / "work"
    work.mkdir()
    adapters = tmp_path / "adapters"
    for name, source in (("support-bot", "qv-r4"), ("billing-bot", "qv-r4")):
        shutil.copytree(assets.adapters / source, adapters / name)
    keys = work / "keys.yaml"
    fill = {  # the placeholders, as a newcomer would replace them
        ".venv/bin/loramux": "loramux", "/etc/loramux/keys.yaml": str(keys), "/models/my-llama": str(assets.base),
        "/adapters": str(adapters), "/merged": str(tmp_path / "merged"), "--port 50051": f"--port {port}",
        "localhost:50051": f"localhost:{port}", "loramux.example:50051": f"127.0.0.1:{port}",
    }
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "loramux").write_text(f"#!/bin/sh\nexec {sys.executable} -m loramux.cli.main \"$@\"\n")
    (shim / "loramux").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{BIN}:{os.environ['PATH']}"}
    env.pop("LORAMUX_API_KEY", None)
    env.pop("LORAMUX_TARGET", None)

    def filled(code: str) -> str:
        for placeholder, value in fill.items():
            code = code.replace(placeholder, value)
        return code

    serving = under("## Serving a model", readme)[0]
    lines = filled(serving[1]).replace("\\\n", " ").splitlines()
    keys_create, serve = (line.split("  #")[0] for line in lines if line.strip())
    admin = subprocess.run(keys_create, shell=True, env=env, capture_output=True, text=True, check=True).stdout.strip()
    operator = subprocess.run(f"loramux keys create --tenant ops --role operator --keys-file {keys}", shell=True, env=env,
                              capture_output=True, text=True, check=True).stdout.strip()
    log = open(tmp_path / "server.log", "w")
    # A session of its own: the shell may fork the server instead of becoming it, and both must end.
    server = subprocess.Popen(serve, shell=True, env=env, stdout=subprocess.PIPE, stderr=log, text=True, cwd=work,
                              start_new_session=True)
    try:
        announced = server.stdout.readline()
        assert announced.startswith("loramux listening on"), (tmp_path / "server.log").read_text()[-3000:]
        env["LORAMUX_API_KEY"] = admin

        (grpcurl,) = under("### With grpcurl", readme)
        for command in filled(grpcurl[1]).replace("\\\n", " ").splitlines():
            done = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (command, done.stdout, done.stderr)

        (python,) = under("### With the Python client", readme)
        code = filled(python[1]).replace('api_key="lmx_..."', f'api_key="{admin}"')
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=work)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "NOT_FOUND ADAPTER_NOT_FOUND" in done.stdout

        (cli,) = under("### With the CLI", readme)
        (work / "answer.json").write_text('{"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}}, '
                                          '"required": ["answer"], "additionalProperties": false}')
        script = "set -e\n" + filled(cli[1]).replace("export LORAMUX_API_KEY=lmx_...", f"export LORAMUX_API_KEY={admin}")
        done = subprocess.run(["bash", "-c", script], env={**env, "OPERATOR_KEY": operator}, capture_output=True,
                              text=True, timeout=300, cwd=work)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "support-bot" in done.stdout and "-v2" in done.stdout
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
        log.close()


@pytest.mark.parametrize("document", ["README.md", "docs/api.md", "docs/deploy.md", "docs/observability.md"])
def test_every_cli_command_the_docs_show_parses(document):
    """Every `loramux ...` line in the docs' shell blocks is a command the CLI accepts (its
    flags and arguments parse), where running it needs a cluster or a GPU."""
    from loramux.cli.parser import build_parser

    parser = build_parser()
    text = (ROOT / document).read_text()
    seen = 0
    for lang, code in blocks(text):
        if lang not in ("sh", "bash", ""):
            continue
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line.startswith("loramux ") or "$(" in line or line.startswith("loramux serve"):
                continue
            import shlex

            argv = shlex.split(line)[1:]
            try:
                parser.parse_args(argv)
            except SystemExit as e:
                pytest.fail(f"{document}: `{line}` does not parse ({e})")
            seen += 1
    assert seen or document != "README.md"
