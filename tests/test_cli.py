"""The `loramux` command against a real server."""

import json
import subprocess
import sys

import pytest

from loramux.cli.main import main
from loramux.server.app import BackgroundServer

COMMANDS = [["serve"], ["adapters"], ["adapters", "load"], ["adapters", "unload"], ["adapters", "list"],
            ["adapters", "show"], ["generate"], ["merge"], ["info"], ["demo"], ["keys"], ["keys", "create"], []]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "loramux")
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0 and "usage: loramux" in capsys.readouterr().out


def test_serve_flags_are_the_contract():
    from loramux.server.serve_command import build_serve_parser

    flags = {opt for action in build_serve_parser()._actions for opt in action.option_strings}
    assert {"--model", "--revision", "--dtype", "--device", "--host", "--port", "--adapter-root", "--merge-root",
            "--adapter-slots", "--host-cache-mib", "--max-lora-rank", "--max-batch-size", "--batch-window-ms",
            "--max-batch-tokens", "--max-prefill-tokens", "--adapter-wait-ms", "--scheduling", "--max-queue-per-tenant",
            "--metrics-port", "--metrics-host", "--otel-traces-exporter", "--otel-metrics-exporter",
            "--otel-exporter-otlp-protocol", "--otel-exporter-otlp-endpoint", "--otel-service-name",
            "--log-format", "--join-ratio", "--join-max-steps", "--auth", "--auth-keys-file"} <= flags


def test_serve_defaults_are_the_settings_defaults(monkeypatch):
    """The flags are made from Settings (each field a flag, with its default and docstring):
    every field a bare `serve` gives equals Settings' own default, and every field has a flag
    with help."""
    import dataclasses

    from loramux.server.serve_command import build_serve_parser, field_docs, flag_of, serve_settings
    from loramux.server.settings import Settings

    parser = build_serve_parser()
    flags = {opt: action for action in parser._actions for opt in action.option_strings}
    docs = field_docs()
    for field in dataclasses.fields(Settings):
        assert flag_of(field.name) in flags and docs.get(field.name), field.name
        assert docs[field.name].split()[0] in flags[flag_of(field.name)].help, field.name

    for name in ("OTEL_SERVICE_NAME", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_PROTOCOL",
                 "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    got = serve_settings(parser.parse_args(["--model", "m", "--auth", "none"]))
    want = Settings(model="m", auth="none")
    differ = {f.name: (getattr(got, f.name), getattr(want, f.name)) for f in dataclasses.fields(Settings)
              if getattr(got, f.name) != getattr(want, f.name)}
    assert differ == {}


def test_bad_settings_exit_2(assets, capsys):
    assert main(["serve", "--model", str(assets.base), "--adapter-slots", "0"]) == 2
    assert "error: --adapter-slots: must be >= 1, got 0" in capsys.readouterr().err  # the flag named once


def test_telemetry_flags_fall_back_to_otel_variables(assets, capsys, monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    assert main(["serve", "--model", str(assets.base)]) == 2
    assert "error: --otel-traces-exporter: 'zipkin' is not one of otlp, console" in capsys.readouterr().err
    # A flag wins over the variable.
    assert main(["serve", "--model", str(assets.base), "--auth", "none", "--otel-traces-exporter", "none",
                 "--metrics-port", "70000"]) == 2
    assert "error: --metrics-port: 70000 is not a TCP port" in capsys.readouterr().err


def test_client_commands(assets, tmp_path, capsys):
    with BackgroundServer(assets.settings(merge_root=tmp_path / "m")) as srv:
        t = ["--target", srv.target]
        assert main(["adapters", "load", "qv-r4", "--source", "qv-r4", "--warm", *t]) == 0
        assert "tier: accelerator" in capsys.readouterr().out
        assert main(["adapters", "list", *t]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split() == ["ADAPTER", "RANK", "TIER", "PINNED", "USES", "SOURCE"] and out[1].split()[:3] == ["qv-r4", "4", "accelerator"]
        assert main(["generate", "--adapter", "qv-r4", "--prompt", "fox", "--max-new-tokens", "8", *t]) == 0
        streamed = capsys.readouterr()
        assert main(["generate", "--adapter", "qv-r4", "--prompt", "fox", "--max-new-tokens", "8", "--no-stream", *t]) == 0
        whole = capsys.readouterr()
        assert streamed.out == whole.out and "prompt +" in streamed.err
        forced = ["generate", "--adapter", "qv-r4", "--prompt", "fox", "--max-new-tokens", "3", "--no-stream",
                  "--logit-bias", "17=100", "--min-tokens", "3", "--presence-penalty", "0.5", *t]
        assert main(forced) == 0
        assert capsys.readouterr().out.rstrip("\n") == assets.tokenizer.decode([17] * 3, skip_special_tokens=True)
        assert main(["generate", "--prompt", "fox", "--max-new-tokens", "8", "--choice", "red fox", "--choice", "blue",
                     "-n", "2", "--temperature", "1", "--seed", "3", *t]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith("--- completion 0 (stop_token)") and out[1] in ("red fox", "blue")
        assert out[2].startswith("--- completion 1 (stop_token)") and out[3] in ("red fox", "blue")
        schema = tmp_path / "schema.json"
        schema.write_text('{"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"], '
                          '"additionalProperties": false}')
        assert main(["generate", "--prompt", "fox", "--max-new-tokens", "16", "--json-schema", str(schema), "--no-stream",
                     *t]) == 0
        assert json.loads(capsys.readouterr().out) in ({"a": True}, {"a": False})
        assert main(["merge", "qv-r4", "out", *t]) == 0
        assert "4 tensors merged" in capsys.readouterr().out
        assert main(["merge", "qv-r4", "out2", "--no-wait", *t]) == 0
        name = capsys.readouterr().out.strip()
        assert main(["operations", "wait", name, "-o", "json", *t]) == 0
        assert json.loads(capsys.readouterr().out)["merged_tensors"] == 4
        assert main(["operations", "list", "-o", "json", *t]) == 0
        ops = json.loads(capsys.readouterr().out)
        assert len(ops) == 2 and all(op["done"] and op["phase"] == "done" and op["error"] == "" for op in ops)
        assert main(["operations", "show", name, *t]) == 0
        shown = capsys.readouterr().out
        assert f"operation: {name}" in shown and "merged_tensors: 4" in shown
        assert main(["operations", "delete", name, *t]) == 0
        assert main(["operations", "show", name, *t]) == 1
        assert "OPERATION_NOT_FOUND" in capsys.readouterr().err
        assert main(["adapters", "show", "missing", *t]) == 1
        assert "NOT_FOUND: ADAPTER_NOT_FOUND" in capsys.readouterr().err
        assert main(["adapters", "unload", "qv-r4", *t]) == 0


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "loramux.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "serve" in out.stdout


def test_global_flags_anywhere_the_target_variable_and_version(assets, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("loramux ")
    with BackgroundServer(assets.settings()) as srv:
        srv.engine.load_adapter("default", "qv-r4", "qv-r4")
        assert main(["--target", srv.target, "-o", "json", "adapters", "list"]) == 0
        before = json.loads(capsys.readouterr().out)
        assert main(["adapters", "list", "--target", srv.target, "-o", "json"]) == 0
        assert json.loads(capsys.readouterr().out) == before and before[0]["adapter_id"] == "qv-r4"
        monkeypatch.setenv("LORAMUX_TARGET", srv.target)
        assert main(["-o", "yaml", "adapters", "show", "qv-r4"]) == 0
        import yaml
        shown = yaml.safe_load(capsys.readouterr().out)
        assert shown["target_modules"] == ["q_proj", "v_proj"] and shown["last_used"] is None
        assert shown["load_time"].endswith("+00:00")  # a time with its zone
        # a flag after the command wins over one before it
        assert main(["--target", "127.0.0.1:1", "--timeout", "2", "info", "--target", srv.target, "-o", "json"]) == 0
        assert json.loads(capsys.readouterr().out)["max_batch_size"] == srv.engine.settings.max_batch_size
        assert main(["adapters", "show", "qv-r4"]) == 0
        text = capsys.readouterr().out
        assert "target_modules: q_proj, v_proj" in text and "last_used: -" in text and "['" not in text
        assert main(["-o", "json", "generate", "--prompt", "fox", "--max-new-tokens", "4", "--top-logprobs", "2",
                     "--prompt-logprobs", "1", "--adapter", "qv-r4"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["token_ids"] == assets.oracle("qv-r4", "fox", 4)
        assert len(result["top_logprobs"]) == len(result["token_ids"]) and result["prompt"]["token_ids"]


def test_messages_roles_errors_said_once_and_ctrl_c(assets, monkeypatch, capsys):
    from loramux.cli import main as cli_main

    assert cli_main._message("Translate: hi") == ("user", "Translate: hi")
    assert cli_main._message("system: be brief") == ("system", "be brief")
    assert cli_main._message("no colon") == ("user", "no colon")
    with BackgroundServer(assets.settings()) as srv:
        capsys.readouterr()  # the server's start-up
        assert main(["adapters", "show", "missing", "--target", srv.target]) == 1
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("error: NOT_FOUND: ADAPTER_NOT_FOUND: "), err

        def interrupted(client, args):
            raise KeyboardInterrupt
        monkeypatch.setitem(cli_main._CLIENT_COMMANDS, "info", interrupted)
        assert main(["info", "--target", srv.target]) == 130
        assert capsys.readouterr().err == "interrupted\n"


def test_shell_completion_is_made_from_the_parser(capsys, tmp_path):
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    path = tmp_path / "loramux.bash"
    path.write_text(script)
    probe = (f"source {path}; COMP_WORDS=(loramux adapters ''); COMP_CWORD=2; _loramux; echo \"${{COMPREPLY[@]}}\"; "
             "COMP_WORDS=(loramux --target x operations w); COMP_CWORD=4; _loramux; echo \"${COMPREPLY[@]}\"; "
             "COMP_WORDS=(loramux generate --js); COMP_CWORD=2; _loramux; echo \"${COMPREPLY[@]}\"")
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].split() == ["list", "load", "show", "unload", "--help"]
    assert out[1].split() == ["wait"]
    assert sorted(out[2].split()) == ["--json", "--json-schema"]
    assert main(["completion", "zsh"]) == 0
    assert capsys.readouterr().out.startswith("autoload -U +X bashcompinit && bashcompinit\n")


def test_local_mistakes_exit_2_with_one_line(tmp_path, capsys):
    assert main(["generate", "--prompt", "x", "--json-schema", str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err == f"error: --json-schema {tmp_path / 'missing.json'}: No such file or directory\n"
    assert main(["generate", "--prompt", "x", "--logit-bias", "x"]) == 2
    assert capsys.readouterr().err == "error: --logit-bias x: expected TOKEN_ID=BIAS, e.g. 17=-100\n"
    assert main(["--target", "127.0.0.1:1", "serve"]) == 2
    assert "takes its own flags after it" in capsys.readouterr().err
    keys = tmp_path / "keys.yaml"
    assert main(["keys", "create", "--tenant", "t", "--role", "user", "--name", "k", "--keys-file", str(keys)]) == 0
    capsys.readouterr()
    assert main(["-o", "json", "keys", "list", "--keys-file", str(keys)]) == 0  # -o before the command, here too
    assert json.loads(capsys.readouterr().out)[0]["name"] == "k"
