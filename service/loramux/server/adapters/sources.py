"""Resolve an adapter source string to a local directory.

- `hf://<repo_id>` (revision from the request): a Hugging Face Hub repository, fetched
  through huggingface_hub into its cache, or read from that cache alone when offline.
- `s3://bucket/path` (and gs://, az:// where installed): objects under one of the server's
  object roots (`--object-root`), fetched to local disk (adapters/objects.py).
- `merged://<output_dir>`: an adapter a merge wrote (adapter_only) under the tenant's own
  directory of the merge root.
- anything else: a directory that must lie under one of the configured adapter roots,
  given absolute or relative to a root (roots tried in order). Symlinks are resolved
  before the check, so a link cannot lead out of the roots; the files inside are checked
  the same way when they are read (checkpoint.py), against the root returned here.

The source string is checked first (length, NUL and control characters, path components),
and no message echoes a resolved server path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from loramux.server.adapters.chat_template import FILES as CHAT_TEMPLATE_FILES
from loramux.server.adapters.objects import ObjectStores, check_object_url, is_object_url
from loramux.server.errors import InvalidRequest, SourceNotFound, SourceOutsideRoot
from loramux.server.hub import HUB_PREFIX, fetch_snapshot
from loramux.server.settings import Settings
from loramux.server.tenancy.source_allowance import ANYWHERE, SourceAllowance  # noqa: F401 (re-exported)

MERGED_PREFIX = "merged://"
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]  # and the chat template's, if any
MAX_PATH_CHARS = 1024
MAX_COMPONENT_CHARS = 255
MAX_REVISION_CHARS = 256


@dataclasses.dataclass(frozen=True)
class ResolvedSource:
    directory: Path
    root: Path  # every file read for the adapter must resolve inside this directory
    hub_revision: str | None  # the commit sha a Hub source resolved to; None for local


def source_kind(source: str) -> str:
    """local, hub, object or merged: the label adapter read times are recorded under."""
    if source.startswith(MERGED_PREFIX):
        return "merged"
    return "hub" if source.startswith(HUB_PREFIX) else "object" if is_object_url(source) else "local"


def check_path_text(value: str, field: str, reason: str) -> None:
    """A path given in a request: bounded, printable, each component a possible file name."""
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise InvalidRequest(f"{field} holds a control character (code {ord(bad)})", field=field, reason=reason)
    if len(value) > MAX_PATH_CHARS:
        raise InvalidRequest(f"{field} is {len(value)} characters long, more than {MAX_PATH_CHARS}", field=field, reason=reason)
    if any(len(part.encode()) > MAX_COMPONENT_CHARS for part in value.split("/")):
        raise InvalidRequest(f"{field} has a path component longer than {MAX_COMPONENT_CHARS} bytes", field=field, reason=reason)


def resolve_source(
    source: str, revision: str, settings: Settings, allowed: SourceAllowance = ANYWHERE, objects: ObjectStores | None = None,
    tenant: str | None = None, max_bytes: int | None = None,
) -> ResolvedSource:
    """Where `source` is, within what `allowed` (the tenant's allowance) and the server permit;
    object-storage sources are fetched through `objects`. `max_bytes`: the most a Hub
    adapter's files may hold (checked before they are downloaded)."""
    if not source:
        raise InvalidRequest("source is required", field="source", reason="SOURCE_REQUIRED")
    check_path_text(source, "source", "SOURCE_INVALID")
    if source.startswith(HUB_PREFIX):
        if len(revision) > MAX_REVISION_CHARS or any(ord(c) < 32 for c in revision):
            raise InvalidRequest(f"revision must be at most {MAX_REVISION_CHARS} printable characters", field="revision", reason="SOURCE_INVALID")
        repo_id = source[len(HUB_PREFIX):]
        if allowed.hub_orgs is not None and repo_id.split("/", 1)[0] not in allowed.hub_orgs:
            raise SourceOutsideRoot(
                f"this tenant's hf:// sources must belong to {', '.join(allowed.hub_orgs) or 'no organisation'}",
                field="source", reason="SOURCE_NOT_ALLOWED", source=source,
            )
        return _resolve_hub(repo_id, revision or None, settings, max_bytes)
    if source.startswith(MERGED_PREFIX):
        own = settings.merge_root / tenant if settings.merge_root is not None and tenant is not None else None
        if own is None or not own.is_dir():
            raise SourceNotFound("this tenant has no merge outputs on this server (--merge-root)", field="source",
                                 source=source)
        directory, root = _resolve_local(source[len(MERGED_PREFIX):] or ".", (own.resolve(),))
        return ResolvedSource(directory, root, None)
    if is_object_url(source):
        url = check_object_url(source)
        if objects is None:
            raise SourceOutsideRoot("this server reads no object storage (--object-root)", field="source",
                                    reason="SOURCE_NOT_ALLOWED", source=source)
        objects.check_allowed(url, allowed.object_prefixes)
        directory = objects.fetch(url)
        return ResolvedSource(directory, directory, None)
    roots = settings.adapter_roots if allowed.roots is None else _tenant_roots(settings.adapter_roots, allowed.roots)
    directory, root = _resolve_local(source, roots)
    return ResolvedSource(directory, root, None)


def _tenant_roots(server_roots: tuple[Path, ...], entries: tuple[str, ...]) -> tuple[Path, ...]:
    """A tenant's own directories: each entry under each server root, where it exists and stays
    inside that root. Every file of the tenant's adapters must then resolve inside one of them."""
    roots = []
    for root in server_roots:
        for entry in entries:
            try:
                path = (root / entry).resolve()
            except (OSError, RuntimeError):
                continue
            if path.is_relative_to(root) and path.is_dir() and path not in roots:
                roots.append(path)
    return tuple(roots)


def _resolve_local(source: str, roots: tuple[Path, ...]) -> tuple[Path, Path]:
    if not roots:
        raise SourceOutsideRoot(
            "no adapter root is configured for this server or tenant (--adapter-root, the keys file's sources); "
            "only hf:// sources load",
            field="source",
            source=source,
        )
    given = Path(source)
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    for candidate in candidates:
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError):  # a symlink loop, permissions
            raise SourceNotFound(f"adapter directory {source!r} cannot be opened", field="source", source=source) from None
        inside = next((root for root in roots if resolved == root or resolved.is_relative_to(root)), None)
        if inside is None:
            raise SourceOutsideRoot(
                f"{source!r} leads outside the adapter roots (through '..', an absolute path or a symlink)",
                field="source",
                source=source,
            )
        if resolved.is_dir():
            return resolved, inside
    raise SourceNotFound(f"no adapter directory {source!r} under the adapter roots", field="source", source=source)


def _resolve_hub(repo_id: str, revision: str | None, settings: Settings, max_bytes: int | None) -> ResolvedSource:
    directory = fetch_snapshot(repo_id, revision, settings, ADAPTER_FILES + list(CHAT_TEMPLATE_FILES), max_bytes=max_bytes)
    # Snapshot files are links into the repository's blobs/: the repository folder is the root.
    return ResolvedSource(directory, directory.parent.parent, directory.name)
