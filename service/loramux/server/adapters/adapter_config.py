"""`adapter_config.json`, read with bounds and matched with peft's rules on a linear-time engine.

An adapter's config comes from whoever wrote the adapter, so nothing in it may run unbounded
on a server thread. Python's `re` backtracks (a pattern like `(a+)+$` runs for minutes while
holding the GIL, which stalls every thread of the process), so every pattern a config
carries (`target_modules` as a string, `exclude_modules`, `layers_pattern`,
`modules_to_save`, the keys of `rank_pattern` and `alpha_pattern`) is compiled with RE2,
which matches in linear time and refuses look-around and back-references. Sizes are capped
before anything is parsed: the file's bytes, JSON nesting, list and pattern counts, pattern
lengths. Numbers must be finite and in range.

The matching rules are peft's (`check_target_module_exists`, `get_pattern_key` in peft
0.21), rewritten here on RE2; a test compares both on the same configs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence

import re2

from loramux.server.errors import AdapterInvalid
from loramux.server.settings import ALL_LINEAR

CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20
MAX_JSON_DEPTH = 16
MAX_LIST_ITEMS = 4096  # target_modules, layers_to_transform, rank_pattern entries, ...
MAX_PATTERN_CHARS = 1024
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.max_mem = 8 << 20  # the compiled program of one pattern
_RE2_OPTIONS.log_errors = False


def invalid(message: str) -> AdapterInvalid:
    return AdapterInvalid(message, reason="ADAPTER_CONFIG_INVALID")


def _compile(pattern: str, what: str):
    if len(pattern) > MAX_PATTERN_CHARS:
        raise invalid(f"{what}: a pattern of {len(pattern)} characters is longer than {MAX_PATTERN_CHARS}")
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as e:
        detail = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise invalid(
            f"{what}: {pattern[:80]!r} is not a pattern loramux accepts ({detail[:120]}); patterns use RE2 syntax, "
            "which has no look-around or back-references"
        ) from None


@dataclasses.dataclass(frozen=True)
class LoraConfigView:
    """The fields of a LoRA config that decide which modules get which rank and scale."""

    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    base_model: str
    base_revision: str  # the base's revision the adapter was trained on ("revision" in the config; "" if none)
    target_modules: object  # compiled RE2 pattern (a string in the config), tuple[str, ...], or ALL_LINEAR
    exclude_modules: object  # the same, or None
    modules_to_save: tuple = ()  # compiled RE2 patterns
    layers_to_transform: frozenset[int] | None = None
    layers_patterns: tuple = ()  # compiled RE2 patterns, () for "any layer name"
    rank_pattern: tuple = ()  # ((compiled, rank), ...) in the config's order
    alpha_pattern: tuple = ()  # ((compiled, alpha), ...)

    # -- peft's rules ---------------------------------------------------------------------

    def targets(self, key: str) -> bool:
        """Whether peft would wrap module `key` (check_target_module_exists)."""
        if self.exclude_modules is not None:
            if isinstance(self.exclude_modules, tuple):
                if key in self.exclude_modules or any(key.endswith(f".{e}") for e in self.exclude_modules):
                    return False
            elif self.exclude_modules.fullmatch(key):
                return False
        if any(p.match(key) for p in self.modules_to_save):
            return False
        if self.target_modules == ALL_LINEAR:  # peft expands it to the names of every linear layer but
            pass  # the output one, which are the modules slots serve: keys here are those
        elif not isinstance(self.target_modules, tuple):
            return self.target_modules.fullmatch(key) is not None
        elif key in self.target_modules:
            return True
        elif not any(key.endswith(f".{t}") for t in self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        index = self._layer_index(key)
        return index is not None and index in self.layers_to_transform

    def _layer_index(self, key: str) -> int | None:
        if not self.layers_patterns:
            m = _ANY_LAYER.match(key)
            return int(m.group("idx")) if m else None
        for pattern in self.layers_patterns:
            m = pattern.match(key)
            if m:
                return int(m.group("idx"))
        return None

    def rank_of(self, key: str) -> int:
        return _first_match(self.rank_pattern, key, self.r)

    def alpha_of(self, key: str) -> float:
        return _first_match(self.alpha_pattern, key, self.lora_alpha)

    def scale_of(self, key: str) -> float:
        r = self.rank_of(key)
        alpha = self.alpha_of(key)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


_ANY_LAYER = re2.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def _first_match(patterns: tuple, key: str, default):
    # get_pattern_key: the first key whose regex matches the end of the module name.
    for compiled, value in patterns:
        if compiled.match(key):
            return value
    return default


# -- parsing ----------------------------------------------------------------------------


def parse_config(raw: bytes) -> dict:
    """The config's JSON object, refused if it is too large or too deeply nested."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise invalid(f"{CONFIG_FILE} is {len(raw)} bytes, more than the {MAX_CONFIG_BYTES} allowed")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(f"{CONFIG_FILE} is not UTF-8 text") from None
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, integers too long, nesting past the C limit
        raise invalid(f"{CONFIG_FILE} is not valid JSON: {str(e)[:200]}") from None
    depth = _nesting(config)
    if depth > MAX_JSON_DEPTH:
        raise invalid(f"{CONFIG_FILE} nests {depth} levels deep, more than the {MAX_JSON_DEPTH} allowed")
    if not isinstance(config, dict):
        raise invalid(f"{CONFIG_FILE} is not a JSON object")
    return config


def _nesting(value: object) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iterative: no recursion)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def view_of(config: dict) -> LoraConfigView:
    """Check the fields loramux reads and compile the patterns (checks the type and range of
    each; the config's other fields are ignored, as peft ignores unknown ones)."""
    r = config.get("r", 8)
    if type(r) is not int or not 1 <= r:
        raise invalid(f"r must be a positive integer, got {_show(r)}")
    alpha = _finite(config.get("lora_alpha", 8), "lora_alpha")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise invalid(f"use_rslora must be true or false, got {_show(use_rslora)}")
    use_dora = config.get("use_dora", False)
    if not isinstance(use_dora, bool):
        raise invalid(f"use_dora must be true or false, got {_show(use_dora)}")
    base_model = config.get("base_model_name_or_path") or ""
    if not isinstance(base_model, str) or len(base_model) > MAX_PATTERN_CHARS:
        raise invalid("base_model_name_or_path must be a string of at most 1024 characters")
    base_revision = config.get("revision") or ""
    if not isinstance(base_revision, str) or len(base_revision) > 256:
        raise invalid("revision must be a string of at most 256 characters")

    targets = config.get("target_modules")
    if targets is None:
        raise invalid("target_modules is required (loramux does not guess targets from the model type)")
    target_modules = _names_or_pattern(targets, "target_modules")
    exclude = config.get("exclude_modules")
    exclude_modules = None if exclude in (None, [], "") else _names_or_pattern(exclude, "exclude_modules")
    to_save = _string_list(config.get("modules_to_save") or [], "modules_to_save")
    modules_to_save = tuple(_compile(rf"(^|.*\.){m}($|\..*)", "modules_to_save") for m in to_save)

    layers = config.get("layers_to_transform")
    layers_to_transform = None
    if layers not in (None, []):
        items = [layers] if type(layers) is int else layers
        if not isinstance(items, list) or len(items) > MAX_LIST_ITEMS or any(type(i) is not int or i < 0 for i in items):
            raise invalid("layers_to_transform must be a layer index or a list of at most 4096 indices >= 0")
        layers_to_transform = frozenset(items)
    patterns = config.get("layers_pattern")
    patterns = [] if patterns in (None, "") else [patterns] if isinstance(patterns, str) else patterns
    layers_patterns = tuple(
        _compile(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", "layers_pattern") for p in _string_list(patterns, "layers_pattern")
    )

    rank_pattern = tuple(
        (compiled, _rank(value, key)) for key, compiled, value in _patterns(config, "rank_pattern")
    )
    alpha_pattern = tuple(
        (compiled, _finite(value, f"alpha_pattern[{key[:40]!r}]")) for key, compiled, value in _patterns(config, "alpha_pattern")
    )
    return LoraConfigView(
        r=r,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        use_dora=use_dora,
        base_model=base_model,
        base_revision=base_revision,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        modules_to_save=modules_to_save,
        layers_to_transform=layers_to_transform,
        layers_patterns=layers_patterns,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _finite(value: object, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise invalid(f"{what} must be a finite number, got {_show(value)}")
    return float(value)


def _rank(value: object, key: str) -> int:
    if type(value) is not int or value < 1:
        raise invalid(f"rank_pattern[{key[:40]!r}] must be a positive integer, got {_show(value)}")
    return value


def _string_list(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_LIST_ITEMS:
        raise invalid(f"{what} must be a list of at most {MAX_LIST_ITEMS} strings")
    for item in value:
        if not isinstance(item, str) or not item or len(item) > MAX_PATTERN_CHARS:
            raise invalid(f"{what} must hold non-empty strings of at most {MAX_PATTERN_CHARS} characters")
    return value


def _names_or_pattern(value: object, what: str):
    """A string is one regular expression (full match), or peft's shorthand `all-linear`; a
    list holds module names (suffixes)."""
    if isinstance(value, str):
        if what == "target_modules" and value.lower() == ALL_LINEAR:
            return ALL_LINEAR
        return _compile(value, what)
    return tuple(_string_list(value, what))


def _patterns(config: dict, what: str) -> Sequence[tuple[str, object, object]]:
    patterns = config.get(what) or {}
    if not isinstance(patterns, dict):
        raise invalid(f"{what} must be an object")
    if len(patterns) > MAX_LIST_ITEMS:
        raise invalid(f"{what} has {len(patterns)} entries, more than {MAX_LIST_ITEMS}")
    return [(key, _compile(rf"(.*\.)?({key})$", what), value) for key, value in patterns.items()]
