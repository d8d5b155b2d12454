"""Merge an adapter into the base weights and write a standalone Hugging Face checkpoint.

Streamed from the base's safetensors files (base_files.py), one tensor at a time, never
from the served weights, into output shards written as their tensors are made: peak host
memory is about three of the largest weight (a read buffer, the float32 delta and, for
16-bit weights, a float32 copy), each allocated once, plus the adapter, on any model size. Output shards are no larger than the
base's largest (or the requested limit).
For each base weight W that the adapter targets: W' = W + scale * B @ A, computed in
float32 on the CPU and cast back to W's dtype. The result must be finite, as peft's
safe_merge checks. Config, generation config and tokenizer files are copied; the manifest
(`loramux_merge.json`) records the provenance and the sha256 of every file. Everything is written into a temporary
directory beside the destination and moved into place only when complete, so a failed
merge leaves nothing behind; a crash can leave a temporary directory, which
`sweep_temporaries` removes at start-up (their names say what they are).

`overwrite` replaces only a previous merge's output, recognised by its manifest
(`loramux_merge.json`), never an arbitrary directory. The check is made when the merge is
asked for and again just before the new output is moved into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from loramux.server.adapters.adapter_config import MAX_CONFIG_BYTES
from loramux.server.adapters.registry import AdapterRecord
from loramux.server.adapters.sources import check_path_text
from loramux.server.lora.weights import AdapterWeights, ModuleLora
from loramux.server.merging.base_files import SINGLE_FILE, TORCH_DTYPES, WEIGHTS_INDEX, BaseCheckpoint, TensorEntry
from loramux.server.merging.combine import Combination
from loramux.server.errors import InvalidRequest, MergeNotFinite, MergeOutputExists, MergeOutputForeign, MergeUnsupported
from loramux.server.store.operations import ResultCodec

MERGE_INFO_FILE = "loramux_merge.json"
TMP_PREFIX = ".loramux-merge-tmp-"
OLD_PREFIX = ".loramux-merge-old-"
_SWEEP_MAX_DIRS = 10_000


@dataclasses.dataclass(frozen=True)
class MergeResult:
    output_path: Path  # on the server's disk: never shown to callers
    files: tuple[str, ...]
    size_bytes: int
    merged_tensors: int
    manifest_sha256: str = ""
    max_logit_difference: float | None = None  # with verification
    output_dir: str = ""  # where it lies under the tenant's directory of the merge root: what callers see


def _encode(result: MergeResult) -> dict:
    return {"output_path": str(result.output_path), "files": list(result.files), "size_bytes": result.size_bytes,
            "merged_tensors": result.merged_tensors, "manifest_sha256": result.manifest_sha256,
            "max_logit_difference": result.max_logit_difference, "output_dir": result.output_dir}


def _decode(saved: dict) -> MergeResult:
    files = saved["files"]
    if not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
        raise ValueError("files is not a list of names")
    difference = saved.get("max_logit_difference")
    return MergeResult(Path(str(saved["output_path"])), tuple(files), int(saved["size_bytes"]), int(saved["merged_tensors"]),
                       str(saved.get("manifest_sha256", "")), None if difference is None else float(difference),
                       str(saved.get("output_dir", "")))


MAX_OUTPUT_DEPTH = 8  # directories an output_dir may go down (engine/merges.py refuses deeper ones)


def outputs_kept(tenant_root: Path) -> dict[Path, int]:
    """The merge outputs under one tenant's directory of the merge root (directories holding a
    merge's info file, down to MAX_OUTPUT_DEPTH), with the bytes of the files in each."""
    found: dict[Path, int] = {}

    def walk(directory: Path, depth: int) -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        if any(e.name == MERGE_INFO_FILE for e in entries):
            found[directory] = sum(e.stat(follow_symlinks=False).st_size for e in entries
                                   if e.is_file(follow_symlinks=False))
            return
        if depth < MAX_OUTPUT_DEPTH:
            for e in entries:
                if e.is_dir(follow_symlinks=False) and not e.name.startswith((TMP_PREFIX, OLD_PREFIX)):
                    walk(Path(e.path), depth + 1)

    walk(tenant_root, 0)
    return found


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
        raise MergeOutputExists(f"{shown!r} exists and is not empty; merge with overwrite (CLI: --overwrite) to replace it", field="output_dir")
    if target.is_symlink() or not target.is_dir() or not (target / MERGE_INFO_FILE).is_file():
        raise MergeOutputForeign(
            f"{shown!r} is not the output of a previous merge (it has no {MERGE_INFO_FILE}); overwrite replaces only "
            "merge outputs. Choose another output_dir.",
            field="output_dir",
        )


def sweep_temporaries(merge_root: Path, ours: Callable[[str | None], bool] = lambda replica: True) -> list[Path]:
    """Remove what interrupted merges left under `merge_root` (those `ours(replica)` accepts:
    with replicas sharing the root, this replica's own and those of replicas that stopped);
    returns what was removed. Merge outputs themselves are not entered."""
    removed = []
    visited = 0
    for current, dirs, files in os.walk(merge_root):
        visited += 1
        if visited > _SWEEP_MAX_DIRS:
            break
        keep = []
        for name in dirs:
            path = Path(current) / name
            if name.startswith((TMP_PREFIX, OLD_PREFIX)) and not path.is_symlink() and ours(temporary_owner(name)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            elif not (path / MERGE_INFO_FILE).is_file():
                keep.append(name)
        dirs[:] = keep
    return removed


@dataclasses.dataclass(frozen=True)
class MergeJob:
    """What a Merge call asks for (the gRPC layer builds it)."""

    output_dir: str
    adapter_id: str = ""  # one adapter, or
    inputs: tuple[str, ...] = ()  # the combination's adapters, in order (weights in `combination`)
    combination: Combination | None = None
    overwrite: bool = False
    max_shard_bytes: int = 0
    verify: bool = False
    adapter_only: bool = False  # write a LoRA checkpoint, not a merged model
    register_as: str = ""  # with adapter_only: register it under this id

    def check(self) -> None:
        if self.max_shard_bytes < 0:
            raise InvalidRequest("max_shard_bytes must be >= 0", field="max_shard_bytes", reason="MAX_SHARD_BYTES_INVALID")
        if (self.combination is None) == (not self.adapter_id):
            raise InvalidRequest("name one adapter_id, or a combination (not both)", field="adapter_id",
                                 reason="MERGE_INPUT_INVALID")
        if self.combination is not None:
            self.combination.check(len(self.inputs))
        if self.register_as and not self.adapter_only:
            raise InvalidRequest("register_as needs adapter_only (a merged model is not an adapter)", field="register_as",
                                 reason="MERGE_INPUT_INVALID")
        if self.verify and self.adapter_only:
            raise InvalidRequest("verify checks a merged model; with adapter_only there is none", field="verify",
                                 reason="MERGE_INPUT_INVALID")


@dataclasses.dataclass(frozen=True)
class MergeProgress:
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int


def merge_to_checkpoint(
    checkpoint: BaseCheckpoint,
    weights: AdapterWeights,
    target: Path,
    provenance: dict,
    progress: Callable[[MergeProgress], None],
    shard_bytes: int | None = None,
    overwrite: bool = False,
    verify: Callable[[Path], float] | None = None,
    replica: str = "",
    transposed: frozenset[str] = frozenset(),
) -> MergeResult:
    """Stream the base's shards through the adapter into `target`: one tensor read, merged and
    written at a time (output shards are no larger than the largest input shard, nor than
    `shard_bytes`). `progress` is called after each tensor; it may
    raise to stop the merge (a cancel), which leaves nothing behind. `verify(directory)`, when
    given, checks the finished checkpoint before it is moved into place and returns the
    largest logit difference, which the manifest records. `transposed`: modules whose weight the
    files hold [in, out] (Conv1D), which get (B A)^T, as peft's fan_in_fan_out merge adds."""
    entries = {e.name: e for e in checkpoint.entries}
    _check_targets(weights, entries, transposed)
    groups = _plan_shards(checkpoint, shard_bytes)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(target.parent, target.name, replica)
    reader = _ShardReader(checkpoint)
    merger = _Merger(max((entries[f"{m}.weight"].nbytes // TORCH_DTYPES[entries[f"{m}.weight"].dtype].itemsize
                          for m in weights.modules), default=0))
    try:
        names = _shard_names(len(groups))
        done = done_bytes = merged = 0
        weight_map = {}
        for fname, group in zip(names, groups):
            with _ShardWriter(tmp / fname, group) as writer:  # header first, then each tensor as it is made
                for entry in group:
                    tensor = reader.get(entry)
                    lora = weights.modules.get(entry.name.removesuffix(".weight")) if entry.name.endswith(".weight") else None
                    if lora is not None:
                        tensor = merger.merge(entry.name, tensor, lora, entry.name.removesuffix(".weight") in transposed)
                        merged += 1
                    writer.write(entry, tensor)
                    weight_map[entry.name] = fname
                    done, done_bytes = done + 1, done_bytes + entry.nbytes
                    progress(MergeProgress(done, len(checkpoint.entries), done_bytes, checkpoint.total_bytes))
        reader.close()
        if len(names) > 1:
            index = {"metadata": {"total_size": checkpoint.total_bytes}, "weight_map": weight_map}
            (tmp / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for path in checkpoint.other_files():  # config, generation config, tokenizer, README
            shutil.copyfile(path, tmp / path.name)
        difference = verify(tmp) if verify is not None else None
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        manifest = dict(provenance, merged_tensors=merged, max_logit_difference=difference,
                        files={name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files})
        (tmp / MERGE_INFO_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_into_place(tmp, target, overwrite, replica)
    except BaseException:
        reader.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    size = sum((target / f).stat().st_size for f in written)
    return MergeResult(output_path=target, files=tuple(written), size_bytes=size, merged_tensors=merged,
                       manifest_sha256=_sha256(target / MERGE_INFO_FILE), max_logit_difference=difference)


class _ShardWriter:
    """One safetensors file written as its tensors are made: the header (names, dtypes, shapes
    and offsets, all known from the base's headers) first, then each tensor's bytes in order,
    so no more than one tensor is held. The layout is safetensors' own: an 8-byte little-endian
    header length, the JSON header padded with spaces to 8 bytes, the data."""

    def __init__(self, path: Path, entries: list[TensorEntry]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for e in entries:
            header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)
        self._expected = iter(entries)
        self._file = open(path, "wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, entry: TensorEntry, tensor: torch.Tensor) -> None:
        if next(self._expected) is not entry or tuple(tensor.shape) != entry.shape:
            raise RuntimeError(f"{entry.name} written out of order or with shape {list(tensor.shape)}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != entry.nbytes:
            raise RuntimeError(f"{entry.name} has {data.nbytes} bytes, the header says {entry.nbytes}")
        self._file.write(memoryview(data))

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        if exc[0] is None and next(self._expected, None) is not None:
            raise RuntimeError("a shard was closed before all its tensors were written")


def _dora_factor(merged: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's merge (peft's): magnitude / ||W + delta|| per output row, scaling W + delta
    (`merged` is [out, in]: a Conv1D's weight comes transposed)."""
    return (magnitude.float() / torch.linalg.norm(merged, dim=1)).view(-1, 1)


class _ShardReader:
    """Tensors read one at a time at their offsets, into one buffer reused for every tensor
    (sized for the largest), with one input shard open at once. A tensor returned is valid
    until the next `get`."""

    def __init__(self, checkpoint: BaseCheckpoint):
        self._directory = checkpoint.directory
        self._buffer = bytearray(max((e.nbytes for e in checkpoint.entries), default=0))
        self._shard: str | None = None
        self._file = None

    def get(self, entry: TensorEntry) -> torch.Tensor:
        if entry.shard != self._shard:
            self.close()
            self._file = open(self._directory / entry.shard, "rb")
            self._shard = entry.shard
        dtype = TORCH_DTYPES[entry.dtype]
        if not entry.nbytes:
            return torch.empty(entry.shape, dtype=dtype)
        self._file.seek(entry.offset)
        if self._file.readinto(memoryview(self._buffer)[: entry.nbytes]) != entry.nbytes:
            raise MergeUnsupported(f"{entry.shard} ends before the bytes of {entry.name}")
        return torch.frombuffer(self._buffer, dtype=dtype, count=entry.nbytes // dtype.itemsize).reshape(entry.shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._shard = self._file = None


class _Merger:
    """W + scale * (B @ A) for one weight at a time, in float32 on the CPU, in buffers sized
    once for the largest targeted weight: the delta, and (for 16-bit weights) W in float32.
    The result has W's dtype, which is what peft's merge_and_unload computes with its float32
    adapter weights: float32 weights come out bit for bit equal."""

    def __init__(self, largest: int):
        self._delta = torch.empty(largest, dtype=torch.float32)
        self._work: torch.Tensor | None = None
        self._largest = largest

    def merge(self, name: str, tensor: torch.Tensor, lora, transposed: bool = False) -> torch.Tensor:
        """`transposed`: W is [in, out] (Conv1D); everything below then works on W^T, a view."""
        shape = (lora.b.shape[0], lora.a.shape[1])
        delta = self._delta[: shape[0] * shape[1]].view(shape)
        torch.mm(lora.b.float(), lora.a.float(), out=delta)
        delta.mul_(lora.scale)
        weight = tensor.T if transposed else tensor  # [out, in]
        if tensor.dtype == torch.float32:
            result = delta.add_(weight)
            if lora.magnitude is not None:
                result.mul_(_dora_factor(result, lora.magnitude))
            if transposed:  # back to the file's [in, out] layout (the buffer holds [out, in])
                result = tensor.copy_(result.T)
        else:
            if self._work is None:
                self._work = torch.empty(self._largest, dtype=torch.float32)
            work = self._work[: delta.numel()].view(shape)
            work.copy_(weight).add_(delta)
            if lora.magnitude is not None:
                work.mul_(_dora_factor(work, lora.magnitude))
            weight.copy_(work)  # rounded to W's dtype, in W's own buffer
            result = tensor
        for rows in result.view(-1).split(1 << 22):  # bounded temporaries
            if not torch.isfinite(rows).all():
                raise MergeNotFinite(f"merging into {name} gives non-finite weights")
        return result


def _check_targets(weights: AdapterWeights, entries: dict[str, TensorEntry], transposed: frozenset[str]) -> None:
    """Every module the adapter changes must be a weight of the base's checkpoint, of the shape
    the adapter's factors make ([in, out] for a Conv1D)."""
    for module, lora in weights.modules.items():
        entry = entries.get(f"{module}.weight")
        shape = (lora.a.shape[1], lora.b.shape[0]) if module in transposed else (lora.b.shape[0], lora.a.shape[1])
        if entry is None:
            raise MergeUnsupported(
                f"the base checkpoint has no tensor {module}.weight for the adapter's module {module!r} (its files name "
                "weights differently from the served model)"
            )
        if entry.shape != shape:
            raise MergeUnsupported(f"{module}.weight is {list(entry.shape)} in the base checkpoint, not {list(shape)}")


def _plan_shards(checkpoint: BaseCheckpoint, shard_bytes: int | None) -> list[list[TensorEntry]]:
    """Tensors in checkpoint order, grouped into output shards no larger than the largest
    input shard (nor `shard_bytes`), unless one tensor alone is larger."""
    limit = checkpoint.largest_shard_bytes if shard_bytes is None else min(shard_bytes, checkpoint.largest_shard_bytes)
    groups: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in checkpoint.entries:
        if groups[-1] and size + entry.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    return groups


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_adapter_config(directory: Path) -> dict:
    """An adapter's config as peft wrote it (it was validated when the adapter was loaded)."""
    with open(directory / ADAPTER_CONFIG, "rb") as f:
        return json.loads(f.read(MAX_CONFIG_BYTES + 1))


def combined_weights(config: dict, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> AdapterWeights:
    """A combination's factors as an adapter, with the scale its config gives (r = lora_alpha:
    1, or sqrt(r) with rslora, as peft computes it)."""
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return AdapterWeights({m: ModuleLora(a, b, scale) for m, (a, b) in factors.items()})


def _adapter_files(config: dict | None, weights: AdapterWeights, source: AdapterRecord, directory: Path) -> None:
    """A PEFT LoRA checkpoint in `directory`: the combination's config and factors, or the
    source adapter's own files."""
    if config is None:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(source.directory / name, directory / name)
        return
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {}
    for module, lora in weights.modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora.a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora.b.contiguous()
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def write_adapter_checkpoint(config: dict | None, weights: AdapterWeights, source: AdapterRecord, target: Path,
                             provenance: dict, overwrite: bool, replica: str = "") -> MergeResult:
    """Write an adapter (a combination, or `source`'s files) as a PEFT checkpoint at `target`,
    with the manifest, through a temporary directory moved into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(target.parent, target.name, replica)
    try:
        _adapter_files(config, weights, source, tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        manifest = dict(provenance, files={n: {"sha256": _sha256(tmp / n), "bytes": (tmp / n).stat().st_size} for n in files})
        (tmp / MERGE_INFO_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_into_place(tmp, target, overwrite, replica)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written = sorted(p.name for p in target.iterdir() if p.is_file())
    return MergeResult(output_path=target, files=tuple(written), size_bytes=sum((target / f).stat().st_size for f in written),
                       merged_tensors=0, manifest_sha256=_sha256(target / MERGE_INFO_FILE))


@contextlib.contextmanager
def adapter_directory(config: dict | None, weights: AdapterWeights, source: AdapterRecord, parent: Path,
                      replica: str = ""):
    """The adapter as files peft can load: `source`'s own directory, or the combination
    written to a temporary directory (removed after; named so that a crash's leftover is swept)."""
    if config is None:
        yield source.directory
        return
    tmp = _temporary(parent, "verify", replica)
    try:
        _adapter_files(config, weights, source, tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


PROBE_PROMPTS = 2
PROBE_TOKENS = 24


def verify_merged(base_dir: Path, adapter_dir: Path, merged_dir: Path, vocab_size: int) -> float:
    """The largest absolute difference between the logits of the merged checkpoint and those of
    the base with the adapter (peft), in float32 on the CPU, over seeded probe prompts. One
    model is held at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (PROBE_PROMPTS, PROBE_TOKENS), generator=generator)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
        reference = PeftModel.from_pretrained(base, str(adapter_dir)).eval()(input_ids=ids).logits
        del base
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
        got = merged(input_ids=ids).logits
        del merged
    return float((got - reference).abs().max())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _temporary(parent: Path, name: str, replica: str) -> Path:
    """A new temporary directory beside an output, named for what it is and for the replica
    that made it (`<prefix><replica>@<name>-<random>`), so that replicas sharing a merge root
    sweep only their own leftovers, and those of replicas that stopped."""
    return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{replica + '@' if replica else ''}{name[:64]}-", dir=parent))


def temporary_owner(name: str) -> str | None:
    """The replica that made a merge temporary (None: made by an older version, unnamed)."""
    for prefix in (TMP_PREFIX, OLD_PREFIX):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return rest.split("@", 1)[0] if "@" in rest else None
    return None


def _swap_into_place(tmp: Path, target: Path, overwrite: bool, replica: str = "") -> None:
    """Move the finished output to `target`, checking again that it may replace what is there."""
    check_replaceable(target, target.name, overwrite)
    old = None
    if target.exists():
        old = target.parent / f"{OLD_PREFIX}{replica + '@' if replica else ''}{target.name[:64]}-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
