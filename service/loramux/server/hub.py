"""The Hugging Face Hub, for the base model and for `hf://` adapters: one way in.

A repository at a revision (a branch, a tag or a commit) is resolved to its commit and the
files wanted are fetched into the local cache (`--hub-cache-dir`), from `--hub-endpoint`
(huggingface_hub's default: huggingface.co) or, with `--hub-offline`, from the cache alone.
The directory returned is the snapshot of that commit; its name is the commit, which the
server records (the base's in GetServerInfo, an adapter's as its revision). Errors become
the domain's: an unknown repository or revision is SOURCE_NOT_FOUND; a Hub that cannot be
reached or answers with a server error is SOURCE_UNAVAILABLE, with a retry hint. An
adapter's files are sized from the Hub's listing before anything is downloaded
(ADAPTER_TOO_LARGE above what any adapter the server accepts can hold). A token for private
repositories comes from huggingface_hub's standard places (HF_TOKEN, the token file).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from loramux.server.errors import AdapterInvalid, InvalidRequest, LoramuxError, SourceNotFound, SourceUnavailable
from loramux.server.settings import Settings

HUB_PREFIX = "hf://"


def fetch_snapshot(repo_id: str, revision: str | None, settings: Settings, allow_patterns: list[str],
                   field: str = "source", max_bytes: int | None = None) -> Path:
    """The snapshot of `repo_id` at `revision` holding the files `allow_patterns` name (exact
    names or fnmatch patterns). With `max_bytes` (online), the files' sizes are read from the
    Hub first and a repository holding more is refused (ADAPTER_TOO_LARGE) before anything is
    downloaded. The download names the revision as asked (so the cache learns the branch or
    tag, for --hub-offline later); a snapshot of another commit than the one checked (the
    branch moved meanwhile) is refused as SOURCE_UNAVAILABLE, to be retried."""
    from huggingface_hub import snapshot_download

    checked = None
    with _hub_errors(repo_id, revision, settings, field):
        if max_bytes is not None and not settings.hub_offline:
            checked = _check_size(repo_id, revision, settings, allow_patterns, max_bytes)
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=settings.hub_cache_dir,
            endpoint=settings.hub_endpoint,
            local_files_only=settings.hub_offline,
            allow_patterns=allow_patterns,
        )
    path = Path(path).resolve()
    if checked is not None and path.name != checked:
        raise SourceUnavailable(f"{repo_id!r} moved from commit {checked[:12]} to {path.name[:12]} while it was "
                                "fetched; retry", field=field, retry_after_s=1.0)
    return path


def _check_size(repo_id: str, revision: str | None, settings: Settings, allow_patterns: list[str], max_bytes: int) -> str:
    """The commit `revision` names, once the files wanted there are found to hold at most
    `max_bytes` (the Hub's listing gives each file's size)."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi

    info = HfApi(endpoint=settings.hub_endpoint).model_info(repo_id, revision=revision, files_metadata=True)
    wanted = [s for s in info.siblings or () if any(fnmatch(s.rfilename, p) for p in allow_patterns)]
    total = sum(s.size or 0 for s in wanted)
    if total > max_bytes:
        raise AdapterInvalid(
            f"the adapter's files in {repo_id!r} hold {total} bytes, more than the {max_bytes} an adapter of "
            "max_lora_rank on every served module can need",
            reason="ADAPTER_TOO_LARGE",
        )
    return info.sha


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, settings: Settings, field: str) -> Iterator[None]:
    """huggingface_hub's errors as the domain's."""
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except LoramuxError:
        raise
    except HFValidationError as e:
        if repo_id.startswith(("/", ".", "~")) or "\\" in repo_id or repo_id.count("/") > 1:  # meant as a path
            raise SourceNotFound(f"no such directory: {repo_id!r}", field=field) from None
        raise InvalidRequest(f"{repo_id!r} is neither a directory nor a Hub repo id ({e})", field=field,
                             reason="SOURCE_INVALID") from e
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


def _unavailable(repo_id: str, cause: BaseException, field: str) -> SourceUnavailable:
    return SourceUnavailable(f"{repo_id!r} could not be fetched from the Hub ({type(cause).__name__}); retry later",
                             field=field, retry_after_s=5.0)
