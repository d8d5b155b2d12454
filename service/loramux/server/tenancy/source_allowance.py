"""Where one tenant's adapters may come from (the keys file's `sources`), as the adapter
sources check it."""

from __future__ import annotations

import dataclasses

from loramux.server.settings import OBJECT_PROTOCOLS


@dataclasses.dataclass(frozen=True)
class SourceAllowance:
    """Where one tenant's adapters may come from; None: wherever the server allows."""

    roots: tuple[str, ...] | None = None  # directories under the adapter roots (relative sources resolve in them)
    hub_orgs: tuple[str, ...] | None = None  # Hub organisations (or users) of hf:// sources
    object_prefixes: tuple[str, ...] | None = None  # object-storage URL prefixes (under the server's object roots)


ANYWHERE = SourceAllowance()


def is_object_url(source: str) -> bool:
    """Whether a source names object storage (s3://, gs://, az://)."""
    return source.split("://", 1)[0] in OBJECT_PROTOCOLS and "://" in source
