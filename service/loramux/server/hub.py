"""The Hugging Face Hub, for the base model and for `hf://` adapters: one way in.

A repository at a revision (a branch, a tag or a commit) is resolved to its commit and the
files wanted are fetched into the local cache (`--hub-cache-dir`), from `--hub-endpoint`
(huggingface_hub's default: huggingface.co) or, with `--hub-offline`, from the cache alone.
The directory returned is the snapshot of that commit; its name is the commit, which the
server records (the base's in GetServerInfo, an adapter's as its revision). Errors become
the domain's: an unknown repository or revision is SOURCE_NOT_FOUND; a Hub that cannot be
reached or answers with a server error is SOURCE_UNAVAILABLE, with a retry hint. A token for
private repositories comes from huggingface_hub's standard places (HF_TOKEN, the token file).
"""

from __future__ import annotations

from pathlib import Path

from loramux.server.errors import InvalidRequest, SourceNotFound, SourceUnavailable
from loramux.server.settings import Settings

HUB_PREFIX = "hf://"


def fetch_snapshot(repo_id: str, revision: str | None, settings: Settings, allow_patterns: list[str],
                   field: str = "source") -> Path:
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
            endpoint=settings.hub_endpoint,
            local_files_only=settings.hub_offline,
            allow_patterns=allow_patterns,
        )
    except HFValidationError as e:
        raise InvalidRequest(f"{repo_id!r} is not a Hub repo id: {e}", field=field, reason="SOURCE_INVALID") from e
    except LocalEntryNotFoundError as e:
        if e.__cause__ is not None:  # online, the Hub could not be reached or failed, and nothing is cached
            raise _unavailable(repo_id, e.__cause__, field) from e
        where = "in the local Hugging Face cache" if settings.hub_offline else "on the Hub or in its local cache"
        raise SourceNotFound(f"{repo_id!r} (revision {revision or 'main'}) not found {where}", field=field,
                             source=f"{HUB_PREFIX}{repo_id}") from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise SourceNotFound(f"{repo_id!r} (revision {revision or 'main'}) not found on the Hub (or not visible to the "
                             "server's token)", field=field, source=f"{HUB_PREFIX}{repo_id}") from e
    except Exception as e:  # network failures, HTTP errors, a full disk: retriable, not the caller's fault
        raise _unavailable(repo_id, e, field) from e
    return Path(path).resolve()


def _unavailable(repo_id: str, cause: BaseException, field: str) -> SourceUnavailable:
    return SourceUnavailable(f"{repo_id!r} could not be fetched from the Hub ({type(cause).__name__}); retry later",
                             field=field, retry_after_s=5.0)
