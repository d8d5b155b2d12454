"""Where one tenant's adapters may come from (the keys file's `sources`), as the adapter
sources check it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SourceAllowance:
    """Where one tenant's adapters may come from; None: wherever the server allows."""

    roots: tuple[str, ...] | None = None  # directories under the adapter roots (relative sources resolve in them)
    hub_orgs: tuple[str, ...] | None = None  # Hub organisations (or users) of hf:// sources
    object_prefixes: tuple[str, ...] | None = None  # object-storage URL prefixes (under the server's object roots)


ANYWHERE = SourceAllowance()
