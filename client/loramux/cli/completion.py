"""Shell completion for `loramux`, made from the argparse tree itself (so it cannot drift):
commands, actions and each one's flags. `eval "$(loramux completion bash)"`, or for zsh
`eval "$(loramux completion zsh)"` (bash's completion through zsh's bashcompinit)."""

from __future__ import annotations

import argparse


def _words(parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, argparse.ArgumentParser]]:
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--") or s == "-o"]
    children: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            children.update(action.choices)
    return flags, children


def _paths(parser: argparse.ArgumentParser, path: str = "") -> list[tuple[str, list[str]]]:
    """Every command path ("", "adapters", "adapters list", ...) with the words that may follow it."""
    flags, children = _words(parser)
    out = [(path, sorted(children) + flags)]
    for name, child in children.items():
        out += _paths(child, f"{path} {name}".strip())
    return out


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    paths = _paths(parser)
    known = "|".join(p for p, _ in paths if p)
    cases = "\n".join(f'        "{p}") words="{" ".join(w)}" ;;' for p, w in paths)
    body = f'''_loramux() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" path="" word candidate words
    for word in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
        candidate="${{path:+$path }}$word"
        case "|{known}|" in *"|$candidate|"*) path="$candidate" ;; esac
    done
    case "$path" in
{cases}
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F _loramux loramux'''
    if shell == "zsh":
        return "autoload -U +X bashcompinit && bashcompinit\n" + body
    return body
