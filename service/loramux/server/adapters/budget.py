"""Every size limit on adapters, computed once from the settings and the slot bank.

The rank limit, an adapter's largest size, what its files may weigh before anything is
downloaded, the accelerator's budget for resident adapters, and how much of it pins may take:
each written here once, and read by the checkpoint checks, the downloads, the cache and the
pin rules alike.
"""

from __future__ import annotations

import dataclasses

from loramux.server.adapters.adapter_config import MAX_CONFIG_BYTES
from loramux.server.adapters.chat_template import MAX_SOURCE_BYTES as MAX_TEMPLATE_SOURCE_BYTES
from loramux.server.adapters.checkpoint import MAX_HEADER_BYTES
from loramux.server.errors import InvalidSettings
from loramux.server.lora.slot_bank import SlotBank
from loramux.server.settings import Settings

RESIDENT_MAX_RANK_ADAPTERS = 8  # the default accelerator budget, in adapters of max_lora_rank
STORED_WIDTH_FACTOR = 4  # an adapter's files may store its weights in up to 4x the serving dtype's width


@dataclasses.dataclass(frozen=True)
class AdapterBudget:
    max_rank: int  # --max-lora-rank: adapters of higher rank in any module are refused
    max_adapter_bytes: int  # an adapter of max_rank on every served module, in the LoRA dtype
    max_download_bytes: int  # the most an adapter's files may hold (checked before a download)
    accelerator_bytes: int  # tier 1: resident adapters' bytes at their true sizes
    max_pinned_bytes: int  # pins may take this much: room stays for one unpinned adapter of any size

    @classmethod
    def of(cls, settings: Settings, bank: SlotBank) -> AdapterBudget:
        largest = bank.bytes_at_rank(settings.max_lora_rank)
        if settings.adapter_memory_mib is None:
            accelerator = RESIDENT_MAX_RANK_ADAPTERS * largest
        else:
            accelerator = int(settings.adapter_memory_mib * 1024 * 1024)
            if accelerator < largest:
                raise InvalidSettings(
                    f"adapter_memory_mib: {settings.adapter_memory_mib:g} MiB cannot hold one adapter of max_lora_rank "
                    f"{settings.max_lora_rank} on every served module ({largest / 2**20:.1f} MiB); raise it or lower "
                    "max_lora_rank",
                    field="adapter_memory_mib",
                )
        return cls(
            max_rank=settings.max_lora_rank,
            max_adapter_bytes=largest,
            max_download_bytes=STORED_WIDTH_FACTOR * largest + MAX_HEADER_BYTES + MAX_CONFIG_BYTES + MAX_TEMPLATE_SOURCE_BYTES,
            accelerator_bytes=accelerator,
            max_pinned_bytes=accelerator - largest,
        )
