"""Load the served base model and tokenizer, and put adapter slots into its Linears."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from loramux.server.adapters.budget import AdapterBudget
from loramux.server.adapters.checkpoint import BaseModelView
from loramux.server.errors import InvalidSettings
from loramux.server.hub import fetch_snapshot
from loramux.server.lora.slot_bank import SlotBank
from loramux.server.settings import Settings

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class BaseModel:
    model: nn.Module
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    bank: SlotBank
    device: torch.device
    dtype: torch.dtype  # the serving dtype
    lora_dtype: torch.dtype  # the LoRA path's (Settings.lora_dtype)
    model_id: str
    revision: str
    max_sequence_length: int
    eos_token_ids: frozenset[int]
    pad_token_id: int
    vocab_size: int
    directory: Path  # the checkpoint it was loaded from (a local directory, or the Hub snapshot of its commit)
    model_bytes: int = 0  # the parameters as served (quantized weights at their stored size)

    def view(self, settings: Settings) -> BaseModelView:
        weights = {name.replace(".base_layer.", "."): p for name, p in self.model.named_parameters()}
        return BaseModelView(
            name=settings.served_model_name,
            revision=self.revision,
            slot_shapes=self.bank.shapes(),
            base_weights=weights,
            module_names=frozenset(name.replace(".base_layer", "") for name, _ in self.model.named_modules()),
            transposed=self.bank.transposed(),
            budget=AdapterBudget.of(settings, self.bank),
            lora_dtype=self.lora_dtype,
            base_mismatch=settings.base_mismatch,
            allow_pickle=settings.allow_pickle_weights,
        )

    @functools.cached_property
    def decode_text(self) -> Callable[[list[int]], str]:
        """`ids -> text` (special tokens skipped) as the engine's detokenizers call it."""
        return fast_decoder(self.tokenizer)

    @property
    def module_order(self) -> list[str]:
        """The model's module names (slot wrappers left out), each once, in the model's order."""
        return list(dict.fromkeys(name.replace(".base_layer", "") for name, _ in self.model.named_modules()))

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base weights under their checkpoint names (slot wrappers and slots left out)."""
        return {name.replace(".base_layer.", "."): t for name, t in self.model.state_dict().items()}


def attention_window(config) -> int | None:
    """The smallest sliding window among the model's attention layers (None: all full
    attention). Layers of any other kind (chunked attention, linear attention or state-space
    layers, shared KV) are refused."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    odd = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if odd:
        raise InvalidSettings(f"attention layers of kind {odd} are not supported; loramux serves full and "
                              "sliding-window attention", field="model")
    windows = [int(kw["sliding_window"]) for kind, kw in zip(layer_types, kwargs) if kind == "sliding_attention"]
    return min(windows) if windows else None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidSettings(f"device {name!r} requested but CUDA is not available", field="device")
    return device


def fast_decoder(tokenizer) -> Callable[[list[int]], str]:
    """`ids -> text` as `tokenizer.decode(ids, skip_special_tokens=True)` computes it. For a
    tokenizer backed by Rust `tokenizers` that does no clean-up of spaces (transformers' own
    step after the Rust decode), the Rust decoder is called directly: transformers' wrapper
    (type conversions, keyword handling) costs several times the decode itself, once per
    row per step on the engine thread."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode") and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def load_base_model(settings: Settings) -> BaseModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(settings.device)
    local = Path(settings.model).expanduser()
    directory = local.resolve() if local.is_dir() else hub_snapshot(settings)
    source = str(directory)
    config = AutoConfig.from_pretrained(source)
    dtype = _pick_dtype(settings.dtype, config, device)
    placement = settings.device_map or {"": device}
    if settings.quantization.startswith("bnb-"):  # quantized as it loads, on its device (it cannot move after)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=placement,
                                                     quantization_config=_bnb_config(settings.quantization, dtype))
    elif settings.device_map:  # accelerate places the layers (and moves activations between devices)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=settings.device_map)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        model.to(device)
    if settings.device_map:
        device = model.get_input_embeddings().weight.device  # where inputs (and sampling) go
    model.eval()
    model.requires_grad_(False)
    if settings.quantization == "int8":
        quantize_linears(model, settings.quantization)
    if settings.quantization == "bnb-4bit" and device.type == "cpu":
        odd = sorted({m.in_features for m in model.modules() if type(m).__name__ == "Linear4bit" and m.in_features % 64})
        if odd:  # its CPU kernel would fail on the first request instead
            raise InvalidSettings(f"bnb-4bit on the CPU needs Linear input widths that are multiples of 64; this model "
                                  f"has {odd}. Use int8 or bnb-8bit", field="quantization")
    tokenizer = AutoTokenizer.from_pretrained(source)
    lora_dtype = torch.float32 if settings.lora_dtype == "float32" else dtype
    if settings.lora_kernel == "triton":
        _check_triton(device)
    try:
        bank = SlotBank(model, settings.target_modules, settings.adapter_slots, settings.max_lora_rank, lora_dtype,
                        settings.lora_kernel)
    except ValueError as e:
        raise InvalidSettings(str(e), field="target_modules") from None

    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = next(iter(eos_ids), 0)
    max_len = int(getattr(config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    window = attention_window(config)
    if window is not None and window < max_len:  # where sliding attention equals full attention (engine/kv_cache.py)
        log.info("sliding-window attention over %d tokens: contexts are capped at %d (the model's own: %d)",
                 window, window, max_len)
        max_len = window
    log.info("loaded %s on %s as %s (%d slot layers)", source, device, dtype, len(bank.layers))
    return BaseModel(
        model=model,
        tokenizer=tokenizer,
        bank=bank,
        device=device,
        dtype=dtype,
        lora_dtype=lora_dtype,
        model_id=settings.model,
        revision="local" if local.is_dir() else directory.name,  # the Hub commit the snapshot holds
        directory=directory,
        max_sequence_length=max_len,
        eos_token_ids=eos_ids,
        pad_token_id=int(pad),
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        model_bytes=parameter_bytes(model),
    )


# A base model's files on the Hub that serving and merging read (weights as safetensors).
BASE_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def hub_snapshot(settings: Settings) -> Path:
    """The base model's files from the Hub at `settings.revision` (default main), in the cache."""
    from loramux.server.errors import LoramuxError

    try:
        directory = fetch_snapshot(settings.model, settings.revision, settings, BASE_FILES, field="model")
    except LoramuxError as e:
        raise InvalidSettings(f"the base model {settings.model!r} could not be loaded: {e.message}", field="model") from e
    if not any(directory.glob("*.safetensors")):
        raise InvalidSettings(f"{settings.model!r} has no safetensors weights at that revision; loramux loads and "
                              "merges safetensors only", field="model")
    return directory


def _bnb_config(method: str, dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise InvalidSettings(f"quantization {method} needs bitsandbytes: install the quant extra "
                              "(pip install 'loramux[quant]')", field="quantization") from e
    if method == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def quantize_linears(model: nn.Module, method: str) -> None:
    """Hold every nn.Linear weight but the output projection's as int8 with a scale per output
    row (torchao's int8 weight-only). The modules stay nn.Linear, so adapter slots wrap them
    as any other; their forward dequantizes on the fly."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise InvalidSettings("quantization int8 needs torchao: install the quant extra (pip install 'loramux[quant]')",
                              field="quantization") from e
    output = model.get_output_embeddings()
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: type(m) is nn.Linear and m is not output)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters take as stored (a quantized weight at its int8 size and
    scales), shared ones once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        inner = [getattr(p, name) for name in getattr(p, "__tensor_flatten__", lambda: ([], None))()[0]]
        total += sum(t.nbytes for t in inner) if inner else p.nbytes
    return total


def _check_triton(device: torch.device) -> None:
    try:
        from loramux.server.lora import triton_kernels
    except ImportError as e:
        raise InvalidSettings(f"lora_kernel triton needs Triton installed ({e}); CUDA builds of torch bring it",
                              field="lora_kernel") from None
    why = triton_kernels.available(device)
    if why:
        raise InvalidSettings(f"lora_kernel triton: {why}", field="lora_kernel")


def _pick_dtype(name: str, config, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # 16-bit matmuls are slow or unsupported on many CPUs
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = _DTYPES.get(stored)
    return stored if stored in (torch.bfloat16, torch.float16) else torch.float32
