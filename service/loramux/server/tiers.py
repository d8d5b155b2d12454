"""Where an adapter's weights are: the cache's three tiers, fastest first (shared vocabulary:
the cache keeps them, the engine reports them, telemetry labels by them)."""

from __future__ import annotations

import enum


class Tier(enum.Enum):
    ACCELERATOR = "accelerator"
    HOST = "host"
    DISK = "disk"
