"""The served base model's checkpoint on disk: its safetensors shards and what they hold.

Merges read from here, not from the served weights (which may be cast, quantized or placed
on the accelerator): the directory the server loaded the model from (a local directory, or
the Hub snapshot of the commit it resolved; `BaseModel.directory`). Only headers are read to build the table; the
tensors are read one at a time when merged, with plain reads at their offsets (not a memory
map, whose pages would stay in the process's memory until the file is closed).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from loramux.server.errors import MergeUnsupported

WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files a checkpoint directory holds besides its weights: never copied into a merge output.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")
WEIGHT_INDEXES = (WEIGHTS_INDEX, "pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json")
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER_BYTES = 100 << 20


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    shard: str  # file name in the checkpoint directory
    dtype: str  # safetensors dtype code (F32, BF16, ...)
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # where its bytes start in the shard file


@dataclasses.dataclass(frozen=True)
class BaseCheckpoint:
    directory: Path
    shards: tuple[str, ...]  # in order
    entries: tuple[TensorEntry, ...]  # shard by shard, in file order
    metadata: dict  # the index's metadata (or {})

    @property
    def largest_shard_bytes(self) -> int:
        sizes: dict[str, int] = {}
        for e in self.entries:
            sizes[e.shard] = sizes.get(e.shard, 0) + e.nbytes
        return max(sizes.values(), default=0)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def other_files(self) -> list[Path]:
        """Top-level files that are not weights: config, generation config, tokenizer, README..."""
        return sorted(
            p for p in self.directory.iterdir()
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES)
            and p.name not in WEIGHT_INDEXES
        )


def read_base_checkpoint(directory: Path) -> BaseCheckpoint:
    """The table of the base's safetensors shards, from their headers."""
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        body = json.loads(index.read_text())
        weight_map = body.get("weight_map") or {}
        shards = tuple(dict.fromkeys(weight_map.values()))
        metadata = body.get("metadata") or {}
    elif (directory / SINGLE_FILE).is_file():
        shards, metadata = (SINGLE_FILE,), {}
    else:
        raise MergeUnsupported(
            "the base model has no safetensors weights (model.safetensors or model.safetensors.index.json); merging "
            "streams from them. Convert the base to safetensors first."
        )
    entries = []
    for shard in shards:
        # A plain file name in the directory (a Hub snapshot's files are links into its blobs).
        path = directory / shard
        if "/" in shard or shard in ("", ".", "..") or not path.is_file():
            raise MergeUnsupported(f"the base's index names a shard {shard!r} that is not a file in its directory")
        entries += _shard_entries(path, shard)
    return BaseCheckpoint(directory, shards, tuple(entries), metadata)


def _shard_entries(path: Path, shard: str) -> list[TensorEntry]:
    with open(path, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 0 < size <= MAX_HEADER_BYTES:
            raise MergeUnsupported(f"{shard} has no readable safetensors header")
        header = json.loads(f.read(size))
    entries = []
    file_size = path.stat().st_size
    for name, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                             key=lambda item: item[1]["data_offsets"][0]):
        shape = tuple(int(d) for d in info["shape"])
        if info["dtype"] not in TORCH_DTYPES:
            raise MergeUnsupported(f"{shard} holds {name} as {info['dtype']}, which merging does not read")
        nbytes = TORCH_DTYPES[info["dtype"]].itemsize * math.prod(shape)
        begin, end = (int(x) for x in info["data_offsets"])
        if end - begin != nbytes or 8 + size + end > file_size:
            raise MergeUnsupported(f"{shard}'s header does not match its data for {name}")
        entries.append(TensorEntry(name, shard, info["dtype"], shape, nbytes, 8 + size + begin))
    return entries
