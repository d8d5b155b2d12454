"""An adapter's own chat template, as a fine-tune saves it beside the adapter: the
`chat_template.jinja` file, or else the `chat_template` of its `tokenizer_config.json` (a
string, or OpenAI-style named templates, of which `default`). Read once, when the adapter is
registered, bounded in size and checked to compile; requests for that adapter render their
messages with it instead of the base tokenizer's."""

from __future__ import annotations

import json
from pathlib import Path

from loramux.server.errors import AdapterInvalid

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
FILES = (TEMPLATE_FILE, TOKENIZER_CONFIG)  # fetched with the adapter from the Hub and object stores when present
MAX_TEMPLATE_BYTES = 256 * 1024
MAX_TOKENIZER_CONFIG_BYTES = 4 << 20  # added_tokens_decoder makes some large
MAX_SOURCE_BYTES = MAX_TEMPLATE_BYTES + MAX_TOKENIZER_CONFIG_BYTES


def read_chat_template(directory: Path, root: Path) -> str | None:
    """The adapter's template, None when it ships none; AdapterInvalid
    (ADAPTER_CHAT_TEMPLATE_INVALID) when the file it ships is unreadable, too large or does
    not compile."""
    from loramux.server.adapters.checkpoint import checked_file, read_bounded

    if (directory / TEMPLATE_FILE).exists() or (directory / TEMPLATE_FILE).is_symlink():
        raw = read_bounded(checked_file(directory / TEMPLATE_FILE, root, _REASON), MAX_TEMPLATE_BYTES, _REASON)
        return _checked(_text(raw, TEMPLATE_FILE), TEMPLATE_FILE)
    if not ((directory / TOKENIZER_CONFIG).exists() or (directory / TOKENIZER_CONFIG).is_symlink()):
        return None
    raw = read_bounded(checked_file(directory / TOKENIZER_CONFIG, root, _REASON), MAX_TOKENIZER_CONFIG_BYTES, _REASON)
    try:
        config = json.loads(_text(raw, TOKENIZER_CONFIG))
    except (ValueError, RecursionError) as e:
        raise _invalid(f"{TOKENIZER_CONFIG} is not valid JSON: {str(e)[:200]}") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        return None
    if not isinstance(template, str):
        raise _invalid(f"{TOKENIZER_CONFIG}'s chat_template is not a string")
    if len(template.encode()) > MAX_TEMPLATE_BYTES:
        raise _invalid(f"{TOKENIZER_CONFIG}'s chat_template is more than {MAX_TEMPLATE_BYTES} bytes")
    return _checked(template, TOKENIZER_CONFIG)


_REASON = "ADAPTER_CHAT_TEMPLATE_INVALID"


def _invalid(message: str) -> AdapterInvalid:
    return AdapterInvalid(message, reason=_REASON)


def _text(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid(f"{name} is not UTF-8 text") from None


def _checked(template: str, name: str) -> str:
    """`template` once it compiles in a sandbox (as transformers renders it)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except Exception as e:  # noqa: BLE001 - jinja's syntax errors, and recursion on hostile nesting
        raise _invalid(f"the chat template in {name} does not compile ({type(e).__name__}: {str(e)[:200]})") from None
    return template
