"""Resolve an adapter source string to a local directory.

- `hf://<repo_id>` (revision from the request): a Hugging Face Hub repository, fetched
  through huggingface_hub into its cache, or read from that cache alone when offline.
- anything else: a directory that must lie under one of the configured adapter roots,
  given absolute or relative to a root (roots tried in order). Symlinks are resolved
  before the check, so a link cannot lead out of the roots.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from loramux.server.errors import InvalidRequest, SourceNotFound, SourceOutsideRoot
from loramux.server.settings import Settings

HUB_PREFIX = "hf://"
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]


@dataclasses.dataclass(frozen=True)
class ResolvedSource:
    directory: Path
    hub_revision: str | None  # the commit sha a Hub source resolved to; None for local


def resolve_source(source: str, revision: str, settings: Settings) -> ResolvedSource:
    if not source:
        raise InvalidRequest("source is required", field="source", reason="SOURCE_REQUIRED")
    if source.startswith(HUB_PREFIX):
        return _resolve_hub(source[len(HUB_PREFIX):], revision or None, settings)
    return ResolvedSource(_resolve_local(source, settings.adapter_roots), None)


def _resolve_local(source: str, roots: tuple[Path, ...]) -> Path:
    if not roots:
        raise SourceOutsideRoot(
            "the server has no adapter root configured (--adapter-root); only hf:// sources load",
            field="source",
            source=source,
        )
    given = Path(source).expanduser()
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
            raise SourceOutsideRoot(
                f"{source!r} resolves to {resolved}, outside the adapter roots "
                f"({', '.join(str(r) for r in roots)})",
                field="source",
                source=source,
            )
        if resolved.is_dir():
            return resolved
    raise SourceNotFound(f"no adapter directory {source!r} under the adapter roots", field="source", source=source)


def _resolve_hub(repo_id: str, revision: str | None, settings: Settings) -> ResolvedSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=settings.hub_cache_dir,
            local_files_only=settings.hub_offline,
            allow_patterns=ADAPTER_FILES,
        )
    except HFValidationError as e:
        raise InvalidRequest(f"{repo_id!r} is not a Hub repo id: {e}", field="source", reason="SOURCE_INVALID") from e
    except (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        where = "in the local Hugging Face cache" if settings.hub_offline else "on the Hub or in its local cache"
        raise SourceNotFound(
            f"adapter {repo_id!r} (revision {revision or 'main'}) not found {where}",
            field="source",
            source=f"{HUB_PREFIX}{repo_id}",
        ) from e
    directory = Path(path)
    return ResolvedSource(directory, directory.name)
