"""How the CLI prints what it read: text for people, JSON or YAML for scripts.

Results are the SDK's dataclasses. `plain` turns them into JSON's types: dataclasses into
objects (field names as the SDK names them), tuples into lists, datetimes into ISO 8601 with
their zone (UTC when the server sent none). Text shows one `field: value` per line (lists
joined with ", ", absent values as "-"), or a table for lists.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys


def plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, datetime.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)).isoformat()
    return value


def document(value, output: str) -> str:
    """`value` as one JSON or YAML document."""
    data = plain(value)
    if output == "yaml":
        import yaml

        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip("\n")
    return json.dumps(data, indent=2, ensure_ascii=False)


def emit(value, output: str, text=None) -> None:
    """Print `value`: as a document for json/yaml, else with `text(value)` (default: fields)."""
    if output != "text":
        print(document(value, output))
    elif text is not None:
        text(value)
    else:
        fields(value)


def shown(value) -> str:
    value = plain(value)
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(shown(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={shown(v)}" for k, v in value.items()) or "-"
    return str(value)


def fields(obj) -> None:
    for name, value in plain(obj).items():
        print(f"{name}: {shown(value)}")


def table(header: tuple[str, ...], rows: list[tuple]) -> None:
    rows = [tuple(shown(c) for c in row) for row in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def note(message: str) -> None:
    """A line for the person at the terminal (stderr: never in a script's document)."""
    print(message, file=sys.stderr)
