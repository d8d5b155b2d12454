"""Read a PEFT LoRA checkpoint and validate it against the served base model.

A checkpoint is accepted only when every tensor in its weights file is used: each
`lora_A`/`lora_B` pair lands in a served slot layer with matching shapes, and any copy of a
base weight is identical to the served base. Anything that would change weights every
tenant shares (`modules_to_save`, trainable tokens, base-layer copies that differ) is
refused, as are LoRA variants the slot layer cannot compute (DoRA, LoRA bias, embedding
LoRA). Validation reads only the files; nothing is registered until it has passed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from loramux.server.adapters.weights import AdapterWeights, ModuleLora
from loramux.server.errors import AdapterIncompatible, AdapterInvalid

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "DoRA (use_dora) adapters",
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
    max_rank: int
    dtype: torch.dtype
    base_mismatch: str  # "error" or "warn"
    allow_pickle: bool


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """What an adapter is, independent of where its weights currently live."""

    rank: int  # largest module rank
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # short names, sorted
    base_model: str
    content_hash: str  # "sha256:<hex>" over config and weights files
    size_bytes: int  # in the serving dtype
    module_ranks: Mapping[str, int]


def read_checkpoint(directory: Path, base: BaseModelView, dtype: torch.dtype | None = None) -> tuple[AdapterSpec, AdapterWeights]:
    """Parse and validate the adapter in `directory`; weights come back on the CPU in `dtype`
    (default: the serving dtype)."""
    config = _read_config(directory)
    _check_config(config, base)
    weights_path = _weights_path(directory, base.allow_pickle)
    tensors = _read_tensors(weights_path)
    content_hash = _hash_files([directory / CONFIG_FILE, weights_path])

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(_PEFT_PREFIX):
            raise AdapterInvalid(f"tensor {key!r} is not a PEFT adapter key (no {_PEFT_PREFIX!r} prefix)")
        inner = key[len(_PEFT_PREFIX):]
        for marker, what in _UNSUPPORTED_KEYS.items():
            if f".{marker}" in inner:
                raise AdapterInvalid(f"{what} are not supported (tensor {key!r})", reason="ADAPTER_UNSUPPORTED")
        m = _LORA_KEY.match(inner)
        if m:
            pairs.setdefault(m["module"], {})[m["which"]] = tensor
        else:
            _check_base_copy(inner, key, tensor, base)

    expected = _expected_modules(config, base)
    modules: dict[str, ModuleLora] = {}
    for module, pair in sorted(pairs.items()):
        modules[module] = _module_lora(module, pair, config, base, dtype or base.dtype)
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
        alpha=float(config.get("lora_alpha", 8)),
        use_rslora=bool(config.get("use_rslora", False)),
        target_modules=tuple(sorted({name.rsplit(".", 1)[-1] for name in modules})),
        base_model=str(config.get("base_model_name_or_path") or ""),
        content_hash=content_hash,
        size_bytes=sum(lora.rank * sum(base.slot_shapes[n]) for n, lora in modules.items())
        * torch.tensor([], dtype=base.dtype).element_size(),
        module_ranks=module_ranks,
    )
    return spec, weights


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterInvalid(f"no {CONFIG_FILE} in the adapter directory", reason="ADAPTER_CONFIG_INVALID")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterInvalid(f"{CONFIG_FILE} is not valid JSON: {e}", reason="ADAPTER_CONFIG_INVALID") from e
    if not isinstance(config, dict):
        raise AdapterInvalid(f"{CONFIG_FILE} is not a JSON object", reason="ADAPTER_CONFIG_INVALID")
    return config


def _check_config(config: dict, base: BaseModelView) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterInvalid(f"peft_type {peft_type!r} is not supported; only LORA adapters are", reason="ADAPTER_UNSUPPORTED")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias"), ("layer_replication", "layer replication")):
        if config.get(flag):
            raise AdapterInvalid(f"{what} adapters ({flag}) are not supported", reason="ADAPTER_UNSUPPORTED")
    if config.get("target_parameters"):
        raise AdapterInvalid("adapters on parameters (target_parameters) are not supported", reason="ADAPTER_UNSUPPORTED")
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        raise AdapterInvalid(f"r must be a positive integer, got {r!r}", reason="ADAPTER_CONFIG_INVALID")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise AdapterInvalid(f"{key} must be an object", reason="ADAPTER_CONFIG_INVALID")
    named = config.get("base_model_name_or_path")
    if not named:
        log.warning("adapter config names no base model; checking shapes only")
    elif not _same_model(str(named), base.name):
        message = f"the adapter was trained on {named!r}, but this server serves {base.name!r}"
        if base.base_mismatch == "error":
            raise AdapterIncompatible(message, adapter_base=named, served_base=base.name)
        log.warning("%s; loading it anyway (base mismatch policy: warn)", message)


def _same_model(named: str, served: str) -> bool:
    """Hub ids match exactly; a local path matches a name ending in the same directory name."""
    if named.rstrip("/") == served.rstrip("/"):
        return True
    return Path(named.rstrip("/")).name == Path(served.rstrip("/")).name


def _weights_path(directory: Path, allow_pickle: bool) -> Path:
    if (directory / SAFETENSORS_FILE).is_file():
        return directory / SAFETENSORS_FILE
    if (directory / PICKLE_FILE).is_file():
        if not allow_pickle:
            raise AdapterIncompatible(
                f"the adapter has only pickle weights ({PICKLE_FILE}); the server loads them only "
                "with --allow-pickle-weights. Convert it to safetensors instead.",
                reason="ADAPTER_PICKLE_REFUSED",
            )
        return directory / PICKLE_FILE
    raise AdapterInvalid(f"no {SAFETENSORS_FILE} in the adapter directory", reason="ADAPTER_WEIGHTS_MISSING")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        tensors = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and OS errors all mean: unreadable file
        raise AdapterInvalid(f"cannot read {path.name}: {type(e).__name__}: {e}") from e
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise AdapterInvalid(f"{path.name} does not hold a flat dict of tensors")
    return tensors


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _check_base_copy(inner: str, key: str, tensor: torch.Tensor, base: BaseModelView) -> None:
    """A saved copy of a base weight is fine only if it is the served weight, unchanged."""
    param = inner.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
    param = re.sub(r"\.original_module\.", ".", param)
    served = base.base_weights.get(param)
    if served is None:
        raise AdapterInvalid(f"tensor {key!r} matches nothing in the base model", reason="ADAPTER_UNSUPPORTED")
    same = served.shape == tensor.shape and torch.equal(served.detach().to("cpu", tensor.dtype), tensor)
    if not same:
        raise AdapterIncompatible(
            f"tensor {key!r} would replace the base weight {param!r} for every tenant "
            "(modules_to_save, trainable tokens or a changed base layer); loramux serves only "
            "LoRA deltas. Merge it into a separate model instead.",
            reason="ADAPTER_MODIFIES_BASE",
            tensor=key,
        )


def _expected_modules(config: dict, base: BaseModelView) -> set[str]:
    """The served modules peft would have wrapped for this config (for the completeness check)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    try:
        lora_config = LoraConfig(**{k: v for k, v in config.items() if k in known and k != "peft_type"})
    except (TypeError, ValueError) as e:
        raise AdapterInvalid(f"adapter config is not a valid LoraConfig: {e}", reason="ADAPTER_CONFIG_INVALID") from e
    return {name for name in base.slot_shapes if check_target_module_exists(lora_config, name)}


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    # Same rule as peft: the first pattern key whose regex matches the end of the module name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module_lora(module: str, pair: dict[str, torch.Tensor], config: dict, base: BaseModelView, dtype: torch.dtype) -> ModuleLora:
    if set(pair) != {"A", "B"}:
        raise AdapterInvalid(f"module {module!r} has lora_{next(iter(pair))} but not its pair")
    if module not in base.slot_shapes:
        if module in base.module_names:
            raise AdapterIncompatible(
                f"the adapter targets {module!r}, which this server does not serve adapters on "
                f"(served: {sorted({n.rsplit('.', 1)[-1] for n in base.slot_shapes})}); "
                "restart with --target-modules including it",
                module=module,
            )
        raise AdapterIncompatible(f"the base model has no module {module!r}", module=module)
    a, b = pair["A"], pair["B"]
    in_f, out_f = base.slot_shapes[module]
    r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    if a.dim() != 2 or b.dim() != 2 or a.shape != (r, in_f) or b.shape != (out_f, r):
        raise AdapterIncompatible(
            f"module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the base layer "
            f"(expected ({r}, {in_f}) and ({out_f}, {r}))",
            module=module,
        )
    if r > base.max_rank:
        raise AdapterIncompatible(
            f"module {module!r} has rank {r}, above this server's max_lora_rank {base.max_rank}",
            reason="ADAPTER_RANK_TOO_LARGE",
            rank=r,
            max_lora_rank=base.max_rank,
        )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterInvalid(f"module {module!r} has non-finite LoRA weights")
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return ModuleLora(a=a.to(dtype).contiguous(), b=b.to(dtype).contiguous(), scale=float(scale))
