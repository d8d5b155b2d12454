"""Read a PEFT LoRA checkpoint and validate it against the served base model.

A checkpoint is accepted only when every tensor in its weights file is used: each
`lora_A`/`lora_B` pair lands in a served slot layer with matching shapes, and any copy of a
base weight is identical to the served base. Anything that would change weights every
tenant shares (`modules_to_save`, trainable tokens, base-layer copies that differ) is
refused, as are LoRA variants the slot layer cannot compute (DoRA, LoRA bias, embedding
LoRA). Validation reads only the files; nothing is registered until it has passed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import dataclasses
import hashlib
import logging
import math
import re
import stat
from collections.abc import Mapping
from pathlib import Path

import torch

from loramux.server.adapters.adapter_config import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    LoraConfigView,
    parse_config,
    view_of,
)
from loramux.server.adapters.chat_template import read_chat_template
from loramux.server.lora.dequantize import dequantized  # the served weight, whatever quantization holds it
from loramux.server.lora.weights import AdapterWeights, ModuleLora
if TYPE_CHECKING:
    from loramux.server.adapters.budget import AdapterBudget
from loramux.server.errors import AdapterIncompatible, AdapterInvalid, LoramuxError, SourceOutsideRoot

log = logging.getLogger(__name__)

SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."
MAX_HEADER_BYTES = 32 << 20  # a safetensors header (JSON); a LoRA on every expert of a large MoE fits
MAX_TENSORS = 100_000
MAX_KEY_CHARS = 1024
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_DORA_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.weight)?$")
_UNSUPPORTED_KEYS = {
    "lora_embedding_A": "LoRA on embedding layers",
    "lora_embedding_B": "LoRA on embedding layers",
    "lora_A.bias": "LoRA bias (lora_bias)",
    "lora_B.bias": "LoRA bias (lora_bias)",
}


@dataclasses.dataclass(frozen=True)
class BaseModelView:
    """What validation needs to know of the served base model."""

    name: str  # the served model's id or path
    slot_shapes: Mapping[str, tuple[int, int]]  # served module -> (in, out)
    base_weights: Mapping[str, torch.Tensor]  # parameter name (no slot wrappers) -> tensor
    module_names: frozenset[str]  # every module name in the base
    budget: AdapterBudget  # every size limit on adapters (budget.py)
    lora_dtype: torch.dtype  # adapters' weights as served (Settings.lora_dtype)
    base_mismatch: str  # "error" or "warn"
    allow_pickle: bool
    revision: str = "local"  # the served base's Hub commit ("local" for a local directory)
    transposed: frozenset[str] = frozenset()  # served modules whose weight is held [in, out] (Conv1D)


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """What an adapter is, independent of where its weights currently live."""

    rank: int  # largest module rank
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # short names, sorted
    base_model: str
    content_hash: str  # "sha256:<hex>" over config and weights files
    size_bytes: int  # in the LoRA dtype
    module_ranks: Mapping[str, int]
    chat_template: str | None = None  # the adapter's own (chat_template.py), used for its requests' messages


def read_checkpoint(
    directory: Path, base: BaseModelView, dtype: torch.dtype | None = None, root: Path | None = None
) -> tuple[AdapterSpec, AdapterWeights]:
    """Parse and validate the adapter in `directory`; weights come back on the CPU in `dtype`
    (default: the LoRA dtype). Every file read must resolve inside `root` (default: the
    directory itself), so a symlink at any level cannot lead elsewhere."""
    root = root or directory
    config_raw = read_bounded(checked_file(directory / CONFIG_FILE, root, "ADAPTER_CONFIG_INVALID"), MAX_CONFIG_BYTES)
    config = parse_config(config_raw)
    _check_supported(config)
    view = view_of(config)
    _check_base_name(view.base_model, base)
    _check_base_revision(view.base_revision, base)
    weights_path, weights_name = _weights_path(directory, root, base.allow_pickle)
    tensors = _read_tensors(weights_path, weights_name, view, base)
    content_hash = _hash(config_raw, weights_path)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        inner = key[len(_PEFT_PREFIX):]
        m = _LORA_KEY.match(inner)
        d = _DORA_KEY.match(inner)
        if m:
            pairs.setdefault(m["module"], {})[m["which"]] = tensor
        elif d:
            magnitudes[d["module"]] = tensor
        else:
            _check_base_copy(inner, key, tensor, base)
    if magnitudes and not view.use_dora:
        raise AdapterInvalid("the file holds DoRA magnitudes but the config does not set use_dora",
                             reason="ADAPTER_CONFIG_INVALID")

    expected = {name for name in base.slot_shapes if view.targets(name)}
    modules: dict[str, ModuleLora] = {}
    for module, pair in sorted(pairs.items()):
        modules[module] = _module_lora(module, pair, view, dtype or base.lora_dtype)
        if view.use_dora:
            modules[module] = _with_dora(module, modules[module], magnitudes.pop(module, None), base)
    if magnitudes:
        raise AdapterInvalid(f"DoRA magnitude without LoRA weights for {next(iter(magnitudes))!r}",
                             reason="ADAPTER_CONFIG_INVALID")
    untargeted = sorted(modules.keys() - expected)
    if untargeted:  # peft would not build these layers: the tensors would go unused
        raise AdapterInvalid(
            f"the file holds LoRA weights for {len(untargeted)} module(s) its config does not target, "
            f"e.g. {untargeted[0]!r}",
            reason="ADAPTER_CONFIG_INVALID",
            untargeted=len(untargeted),
        )
    missing = sorted(expected - modules.keys())
    if missing:
        raise AdapterInvalid(
            f"the config targets {len(missing)} module(s) that have no weights in the file, "
            f"e.g. {missing[0]!r}: the file is incomplete",
            reason="ADAPTER_WEIGHTS_MISSING",
            missing=len(missing),
        )
    if not modules:
        raise AdapterInvalid("the weights file holds no LoRA tensors", reason="ADAPTER_WEIGHTS_MISSING")

    weights = AdapterWeights(modules)
    module_ranks = {name: lora.rank for name, lora in modules.items()}
    spec = AdapterSpec(
        rank=max(module_ranks.values()),
        alpha=view.lora_alpha,
        use_rslora=view.use_rslora,
        target_modules=tuple(sorted({name.rsplit(".", 1)[-1] for name in modules})),
        base_model=view.base_model,
        content_hash=content_hash,
        size_bytes=sum(lora.rank * sum(base.slot_shapes[n]) for n, lora in modules.items())
        * torch.tensor([], dtype=base.lora_dtype).element_size(),
        module_ranks=module_ranks,
        chat_template=read_chat_template(directory, root),
    )
    return spec, weights


def checked_file(path: Path, root: Path, missing_reason: str) -> Path:
    """`path` resolved (symlinks at every level), inside `root`, a regular file; else refused.
    Messages name the file, never a server path."""
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise AdapterInvalid(f"no {path.name} in the adapter directory", reason=missing_reason) from None
    except (OSError, RuntimeError):  # a symlink loop, a name too long, permissions
        raise AdapterInvalid(f"{path.name} cannot be opened", reason=missing_reason) from None
    if not resolved.is_relative_to(root):
        raise SourceOutsideRoot(f"{path.name} is a link that leads outside the adapter's root", field="source")
    try:
        mode = resolved.stat().st_mode
    except OSError:
        raise AdapterInvalid(f"{path.name} cannot be opened", reason=missing_reason) from None
    if not stat.S_ISREG(mode):
        raise AdapterInvalid(f"{path.name} is not a regular file", reason=missing_reason)
    return resolved


def read_bounded(path: Path, limit: int, reason: str = "ADAPTER_CONFIG_INVALID") -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise AdapterInvalid(f"cannot read {path.name}: {e.strerror}", reason=reason) from None
    if len(data) > limit:
        raise AdapterInvalid(f"{path.name} is larger than {limit} bytes", reason=reason)
    return data


def _check_supported(config: dict) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        shown = peft_type if isinstance(peft_type, str) and len(peft_type) <= 40 else "?"
        raise AdapterInvalid(f"peft_type {shown!r} is not supported; only LORA adapters are", reason="ADAPTER_UNSUPPORTED")
    for flag, what in (("lora_bias", "LoRA bias"), ("layer_replication", "layer replication")):
        if config.get(flag):
            raise AdapterInvalid(f"{what} adapters ({flag}) are not supported", reason="ADAPTER_UNSUPPORTED")
    if config.get("target_parameters"):
        raise AdapterInvalid("adapters on parameters (target_parameters) are not supported", reason="ADAPTER_UNSUPPORTED")


def _check_base_name(named: str, base: BaseModelView) -> None:
    if not named:
        log.warning("adapter config names no base model; checking shapes only")
    elif not _same_model(named, base.name):
        message = f"the adapter was trained on {named[:200]!r}, but this server serves {base.name!r}"
        if base.base_mismatch == "error":
            raise AdapterIncompatible(message, adapter_base=named[:200], served_base=base.name)
        log.warning("%s; loading it anyway (base mismatch policy: warn)", message)


def _check_base_revision(trained_on: str, base: BaseModelView) -> None:
    """An adapter that records the base revision it was trained on (peft's `revision`) must
    name the commit the server serves, when the base came from the Hub: a branch or tag name
    cannot be checked against a commit, and is let through."""
    if not trained_on or base.revision == "local" or not _COMMIT.fullmatch(trained_on):
        return
    if trained_on != base.revision:
        message = (f"the adapter was trained on revision {trained_on} of its base, but this server serves revision "
                   f"{base.revision}")
        if base.base_mismatch == "error":
            raise AdapterIncompatible(message, reason="ADAPTER_BASE_REVISION", adapter_revision=trained_on,
                                      served_revision=base.revision)
        log.warning("%s; loading it anyway (base mismatch policy: warn)", message)


_COMMIT = re.compile(r"[0-9a-f]{40}")


def _same_model(named: str, served: str) -> bool:
    """Hub ids match exactly; a local path matches a name ending in the same directory name."""
    if named.rstrip("/") == served.rstrip("/"):
        return True
    return Path(named.rstrip("/")).name == Path(served.rstrip("/")).name


def _weights_path(directory: Path, root: Path, allow_pickle: bool) -> tuple[Path, str]:
    """(the weights file resolved, its name in the adapter directory)."""
    if (directory / SAFETENSORS_FILE).exists() or (directory / SAFETENSORS_FILE).is_symlink():
        return checked_file(directory / SAFETENSORS_FILE, root, "ADAPTER_WEIGHTS_MISSING"), SAFETENSORS_FILE
    if (directory / PICKLE_FILE).exists() or (directory / PICKLE_FILE).is_symlink():
        if not allow_pickle:
            raise AdapterIncompatible(
                f"the adapter has only pickle weights ({PICKLE_FILE}); the server loads them only "
                "with --allow-pickle-weights. Convert it to safetensors instead.",
                reason="ADAPTER_PICKLE_REFUSED",
            )
        return checked_file(directory / PICKLE_FILE, root, "ADAPTER_WEIGHTS_MISSING"), PICKLE_FILE
    raise AdapterInvalid(f"no {SAFETENSORS_FILE} in the adapter directory", reason="ADAPTER_WEIGHTS_MISSING")


def _read_tensors(path: Path, name: str, view: LoraConfigView, base: BaseModelView) -> dict[str, torch.Tensor]:
    """The file's tensors, each key and shape checked against the base before its data is read
    (so a hostile file costs no more memory than a valid adapter of its size). `name` is the
    file's name in the adapter directory, which says its format: `path`, resolved, may be a
    Hub cache blob named by its hash."""
    if not name.endswith(".safetensors"):
        try:
            tensors = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle and OS errors alike: unreadable
            raise AdapterInvalid(f"cannot read {name}: {_describe(e)}") from None
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise AdapterInvalid(f"{name} does not hold a flat dict of tensors")
        if len(tensors) > MAX_TENSORS:
            raise AdapterInvalid(f"{name} holds {len(tensors)} tensors, more than {MAX_TENSORS}")
        for key, tensor in tensors.items():
            _check_entry(key, tuple(tensor.shape), tensor.is_floating_point(), view, base)
        return tensors

    from safetensors import safe_open

    try:
        with path.open("rb") as f:
            head = f.read(8)
        header_bytes = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < header_bytes <= MAX_HEADER_BYTES:
            raise AdapterInvalid(f"{name} has no safetensors header of at most {MAX_HEADER_BYTES} bytes")
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            if len(keys) > MAX_TENSORS:
                raise AdapterInvalid(f"{name} holds {len(keys)} tensors, more than {MAX_TENSORS}")
            for key in keys:
                piece = f.get_slice(key)
                _check_entry(key, tuple(piece.get_shape()), piece.get_dtype() in _FLOAT_DTYPES, view, base)
            for key in keys:
                tensors[key] = f.get_tensor(key)
        return tensors
    except LoramuxError:
        raise
    except Exception as e:  # safetensors and OS errors alike: an unreadable or truncated file
        raise AdapterInvalid(f"cannot read {name}: {_describe(e)}") from None


def _describe(error: BaseException) -> str:
    """An error's text for a client: never a server path."""
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    return f"{type(error).__name__}: {str(error)[:200]}"


def _check_entry(key: str, shape: tuple[int, ...], floating: bool, view: LoraConfigView, base: BaseModelView) -> None:
    """Refuse a tensor by its key, dtype and shape alone."""
    shown = key if len(key) <= 120 else key[:117] + "..."
    if len(key) > MAX_KEY_CHARS:
        raise AdapterInvalid(f"tensor key {shown!r} is longer than {MAX_KEY_CHARS} characters")
    if not key.startswith(_PEFT_PREFIX):
        raise AdapterInvalid(f"tensor {shown!r} is not a PEFT adapter key (no {_PEFT_PREFIX!r} prefix)")
    inner = key[len(_PEFT_PREFIX):]
    for marker, what in _UNSUPPORTED_KEYS.items():
        if f".{marker}" in inner:
            raise AdapterInvalid(f"{what} are not supported (tensor {shown!r})", reason="ADAPTER_UNSUPPORTED")
    if not floating:
        raise AdapterInvalid(f"tensor {shown!r} is not a floating-point tensor")
    d = _DORA_KEY.match(inner)
    if d is not None:  # a DoRA magnitude: one value per output feature of a served module
        served = base.slot_shapes.get(d["module"])
        if served is None:
            raise AdapterIncompatible(f"the DoRA magnitude {shown!r} is for a module this server does not serve adapters on",
                                      module=d["module"][:200])
        if shape not in ((served[1],), (served[1], 1)):
            raise AdapterIncompatible(f"the DoRA magnitude {shown!r} has shape {shape}, not ({served[1]},)",
                                      tensor=shown)
        return
    m = _LORA_KEY.match(inner)
    if m is None:
        param = _base_param(inner)
        served = base.base_weights.get(param)
        if served is None:
            raise AdapterInvalid(f"tensor {shown!r} matches nothing in the base model", reason="ADAPTER_UNSUPPORTED")
        if tuple(served.shape) != shape:
            raise AdapterIncompatible(
                f"tensor {shown!r} has shape {shape}, but the base weight {param!r} is {tuple(served.shape)}",
                reason="ADAPTER_MODIFIES_BASE",
                tensor=shown,
            )
        return
    module = m["module"]
    if module not in base.slot_shapes:
        if module in base.module_names:
            raise AdapterIncompatible(
                f"the adapter targets {module!r}, which this server does not serve adapters on "
                f"(served: {sorted({n.rsplit('.', 1)[-1] for n in base.slot_shapes})}); "
                "restart with --target-modules including it",
                module=module,
            )
        raise AdapterIncompatible(f"the base model has no module {module[:120]!r}", module=module[:120])
    in_f, out_f = base.slot_shapes[module]
    r = view.rank_of(module)
    expected = (r, in_f) if m["which"] == "A" else (out_f, r)
    if shape != expected:
        raise AdapterIncompatible(
            f"module {module!r}: lora_{m['which']} {shape} does not fit the base layer (expected {expected})",
            module=module,
        )
    if r > base.budget.max_rank:
        raise AdapterIncompatible(
            f"module {module!r} has rank {r}, above this server's max_lora_rank {base.budget.max_rank}",
            reason="ADAPTER_RANK_TOO_LARGE",
            rank=r,
            max_lora_rank=base.budget.max_rank,
        )


def _base_param(inner: str) -> str:
    return inner.replace(".base_layer.", ".").replace(".modules_to_save.", ".").replace(".original_module.", ".")


def _hash(config_raw: bytes, weights_path: Path) -> str:
    """sha256 over the config's bytes (as read and validated) and the weights file."""
    digest = hashlib.sha256(config_raw)
    with weights_path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _check_base_copy(inner: str, key: str, tensor: torch.Tensor, base: BaseModelView) -> None:
    """A saved copy of a base weight is fine only if it is the served weight, unchanged."""
    param = _base_param(inner)
    served = base.base_weights[param]  # present and of the same shape: _check_entry
    if not torch.equal(served.detach().to("cpu", tensor.dtype), tensor):
        raise AdapterIncompatible(
            f"tensor {key!r} would replace the base weight {param!r} for every tenant "
            "(modules_to_save, trainable tokens or a changed base layer); loramux serves only "
            "LoRA deltas. Merge it into a separate model instead.",
            reason="ADAPTER_MODIFIES_BASE",
            tensor=key,
        )


def _with_dora(module: str, lora: ModuleLora, magnitude: torch.Tensor | None, base: BaseModelView) -> ModuleLora:
    """A DoRA module: its magnitude, and magnitude / ||W + scale B A|| per output row computed
    now, in float32 from the served base weight (dequantized if it is quantized), as peft
    computes it when the adapter loads."""
    if magnitude is None:
        raise AdapterInvalid(f"use_dora is set but module {module!r} has no lora_magnitude_vector",
                             reason="ADAPTER_WEIGHTS_MISSING")
    magnitude = magnitude.float().reshape(-1)
    if not torch.isfinite(magnitude).all():
        raise AdapterInvalid(f"module {module!r} has a non-finite DoRA magnitude")

    with torch.no_grad():  # (not .detach() first: it would drop a quantized parameter's state)
        weight = dequantized(base.base_weights[f"{module}.weight"]).detach().to("cpu", torch.float32)
    if module in base.transposed:  # a Conv1D's weight is [in, out]; DoRA's norms are per output feature
        weight = weight.T
    norm = torch.linalg.norm(weight + lora.scale * (lora.b.float().cpu() @ lora.a.float().cpu()), dim=1)
    scale = magnitude / norm
    if not torch.isfinite(scale).all():
        raise AdapterInvalid(f"module {module!r} has a DoRA scale that is not finite (a zero weight row)")
    return dataclasses.replace(lora, magnitude=magnitude, dora_scale=scale)


def _module_lora(module: str, pair: dict[str, torch.Tensor], view: LoraConfigView, dtype: torch.dtype) -> ModuleLora:
    """One module's A and B (shapes already checked), finite, in `dtype`, with its scale."""
    if set(pair) != {"A", "B"}:
        raise AdapterInvalid(f"module {module!r} has lora_{next(iter(pair))} but not its pair")
    a, b = pair["A"], pair["B"]
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterInvalid(f"module {module!r} has non-finite LoRA weights")
    a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterInvalid(f"module {module!r} has LoRA weights too large for {dtype}")
    scale = view.scale_of(module)
    if not math.isfinite(scale):
        raise AdapterInvalid(f"module {module!r} has a non-finite scale", reason="ADAPTER_CONFIG_INVALID")
    return ModuleLora(a=a, b=b, scale=float(scale))
