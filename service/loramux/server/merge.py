"""Merge an adapter into the base weights and write a standalone Hugging Face checkpoint.

For each base weight W that the adapter targets: W' = W + scale * B @ A, computed in
float32 from the adapter's files (not from a slot) and cast back to W's dtype. The result
must be finite, as peft's safe_merge checks. Everything is written into a temporary
directory beside the destination and moved into place only when complete, so a failed
merge leaves nothing behind; a crash can leave a temporary directory, which
`sweep_temporaries` removes at start-up (their names say what they are).

`overwrite` replaces only a previous merge's output, recognised by its manifest
(`loramux_merge.json`), never an arbitrary directory. The check is made when the merge is
asked for and again just before the new output is moved into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from loramux.server.adapters.weights import AdapterWeights
from loramux.server.base_model import BaseModel
from loramux.server.adapters.sources import check_path_text
from loramux.server.errors import InvalidRequest, LoramuxError, MergeOutputExists, MergeOutputForeign
from loramux.server.operations import ResultCodec

SHARD_BYTES = 2 * 1024**3
MERGE_INFO_FILE = "loramux_merge.json"
TMP_PREFIX = ".loramux-merge-tmp-"
OLD_PREFIX = ".loramux-merge-old-"
_SWEEP_MAX_DIRS = 10_000


@dataclasses.dataclass(frozen=True)
class MergeResult:
    output_path: Path
    files: tuple[str, ...]
    size_bytes: int
    merged_tensors: int


def _encode(result: MergeResult) -> dict:
    return {"output_path": str(result.output_path), "files": list(result.files), "size_bytes": result.size_bytes,
            "merged_tensors": result.merged_tensors}


def _decode(saved: dict) -> MergeResult:
    return MergeResult(Path(saved["output_path"]), tuple(saved["files"]), saved["size_bytes"], saved["merged_tensors"])


MERGE_RESULTS = ResultCodec(_encode, _decode)  # how merge results are kept in the state store


def resolve_output(merge_root: Path, output_dir: str, overwrite: bool) -> Path:
    if not output_dir:
        raise InvalidRequest("output_dir is required", field="output_dir", reason="OUTPUT_DIR_REQUIRED")
    check_path_text(output_dir, "output_dir", "OUTPUT_DIR_INVALID")
    try:
        target = (merge_root / output_dir).resolve()
    except (OSError, RuntimeError):
        raise InvalidRequest("output_dir cannot be resolved", field="output_dir", reason="OUTPUT_DIR_INVALID") from None
    if target == merge_root or not target.is_relative_to(merge_root):
        shown = output_dir if len(output_dir) <= 80 else output_dir[:77] + "..."
        raise InvalidRequest(
            f"output_dir {shown!r} must name a directory inside the merge root", field="output_dir", reason="OUTPUT_OUTSIDE_ROOT"
        )
    if any(part.startswith((TMP_PREFIX, OLD_PREFIX)) for part in target.relative_to(merge_root).parts):
        raise InvalidRequest("output_dir uses a name reserved for merge temporaries", field="output_dir", reason="OUTPUT_DIR_INVALID")
    check_replaceable(target, output_dir, overwrite)
    return target


def check_replaceable(target: Path, output_dir: str, overwrite: bool) -> None:
    """An output may be written where nothing is, in an empty directory, or with `overwrite`
    over a previous merge's output; nowhere else."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return
    shown = output_dir if len(output_dir) <= 80 else output_dir[:77] + "..."
    if not overwrite:
        raise MergeOutputExists(f"{shown!r} exists and is not empty; set overwrite to replace it", field="output_dir")
    if target.is_symlink() or not target.is_dir() or not (target / MERGE_INFO_FILE).is_file():
        raise MergeOutputForeign(
            f"{shown!r} is not the output of a previous merge (it has no {MERGE_INFO_FILE}); overwrite replaces only "
            "merge outputs. Choose another output_dir.",
            field="output_dir",
        )


def sweep_temporaries(merge_root: Path) -> list[Path]:
    """Remove what interrupted merges left under `merge_root`; returns what was removed.
    Merge outputs themselves are not entered."""
    removed = []
    visited = 0
    for current, dirs, files in os.walk(merge_root):
        visited += 1
        if visited > _SWEEP_MAX_DIRS:
            break
        keep = []
        for name in dirs:
            path = Path(current) / name
            if name.startswith((TMP_PREFIX, OLD_PREFIX)) and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            elif not (path / MERGE_INFO_FILE).is_file():
                keep.append(name)
        dirs[:] = keep
    return removed


def merge_to_checkpoint(
    base: BaseModel,
    weights: AdapterWeights,
    target: Path,
    provenance: dict,
    progress: Callable[[int, int], None],
    shard_bytes: int = SHARD_BYTES,
    overwrite: bool = False,
) -> MergeResult:
    state = base.base_state_dict()
    names = _unique_tensors(state)
    total = len(names)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name[:64]}-", dir=target.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        shard_size = 0
        merged = 0
        for done, name in enumerate(names, 1):
            tensor = state[name]
            module = name.removesuffix(".weight")
            lora = weights.modules.get(module) if name.endswith(".weight") else None
            if lora is not None:
                delta = lora.scale * (lora.b.float() @ lora.a.float())
                new = (tensor.detach().float().cpu() + delta).to(tensor.dtype)
                if not torch.isfinite(new).all():
                    raise LoramuxError(f"merging into {name} gives non-finite weights", reason="MERGE_NOT_FINITE")
                tensor = new
                merged += 1
            tensor = tensor.detach().to("cpu").contiguous()
            if shard_size and shard_size + tensor.nbytes > shard_bytes:
                shards.append({})
                shard_size = 0
            shards[-1][name] = tensor
            shard_size += tensor.nbytes
            progress(done, total)
        if merged != len(weights.modules):
            raise LoramuxError(f"merged {merged} of the adapter's {len(weights.modules)} modules", reason="MERGE_INCOMPLETE")
        _write_shards(tmp, shards)
        base.model.config.save_pretrained(str(tmp))
        if getattr(base.model, "generation_config", None) is not None:
            base.model.generation_config.save_pretrained(str(tmp))
        base.tokenizer.save_pretrained(str(tmp))
        (tmp / MERGE_INFO_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        _swap_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    size = sum((target / f).stat().st_size for f in written)
    return MergeResult(output_path=target, files=tuple(written), size_bytes=size, merged_tensors=merged)


def _unique_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names in order, dropping tensors that share storage with an earlier one (tied weights:
    transformers ties them again on load)."""
    seen: set[tuple[int, int]] = set()
    names = []
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        names.append(name)
    return names


def _write_shards(directory: Path, shards: list[dict[str, torch.Tensor]]) -> list[str]:
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    files = []
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.nbytes for shard in shards for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def _swap_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished output to `target`, checking again that it may replace what is there."""
    check_replaceable(target, target.name, overwrite)
    old = None
    if target.exists():
        old = target.parent / f"{OLD_PREFIX}{target.name[:64]}-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
