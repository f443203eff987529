"""A PEFT LoRA adapter's `adapter_config.json`: read, checked, and asked what it targets.

`read_settings` refuses, naming the file and the field, every config whose adapter is
not plain LoRA (`y += scale * B(A(x))` on linear layers): other PEFT types, LoRA variants
with another forward (DoRA, aLoRA...), trained biases or full modules, initialisations
that rewrote the base weights. `LoraSettings` then answers, as PEFT 0.21 does, which
modules the config targets and each module's rank and scale. Pure Python, no tensors.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from hotweights.errors import LoadError

ADAPTER_CONFIG = "adapter_config.json"

_UNSUPPORTED: dict[str, str] = {
    "use_dora": "DoRA is not supported (it rescales each output by a learned magnitude)",
    "lora_bias": "a bias on lora_B is not supported",
    "modules_to_save": "not supported: those modules are full weights, not a low-rank update",
    "trainable_token_indices": "not supported: those are embedding rows, not a low-rank update",
    "target_parameters": "LoRA on bare parameters (such as MoE experts) is not supported",
    "layer_replication": "not supported: it changes the base model's stack of layers",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "use_qalora": "QA-LoRA is not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "KaSA is not supported",
}
"""Config fields that, when set, make the adapter something other than `y += scale*B(A(x))`."""

_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
"""`init_lora_weights` values that also rewrote the base weights the adapter expects."""


@dataclass(frozen=True)
class LoraSettings:
    """A checked adapter config: the fields that decide targeting and scaling."""

    path: Path
    """The `adapter_config.json` they come from."""
    raw: dict[str, Any]
    """The whole parsed config."""
    base_model: str | None
    """`base_model_name_or_path`; None when absent or empty."""
    r: int
    alpha: float
    rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target: str | list[str] | None
    """`target_modules`: a regex to fullmatch, or names to match whole or as a dotted suffix;
    None (absent, or a hand-written `all-linear`) targets any module."""
    exclude: str | list[str] | None
    layers: list[int] | None
    """`layers_to_transform`; None when every layer is."""
    layers_pattern: list[str] | None

    def targets(self, module: str) -> bool:
        """Whether PEFT puts LoRA on `module` (its `check_target_module_exists`)."""
        if self.exclude is not None and _matches(self.exclude, module):
            return False
        target = self.target
        if target is None or isinstance(target, str):
            return target is None or re.fullmatch(target, module) is not None
        if module in target:
            return True
        if not _matches(target, module):
            return False
        if self.layers is None:
            return True
        # The layer index is the first numbered segment (after `layers_pattern`, when set).
        prefixes = [rf"(?:^|.*?\.){p}" for p in self.layers_pattern or []] or [r".*?\.[^.]*"]
        for prefix in prefixes:
            found = re.match(rf"{prefix}\.(?P<idx>\d+)\.", module)
            if found is not None:
                return int(found["idx"]) in self.layers
        return False

    def unmatched_target(self, modules: list[str]) -> str | None:
        """The first `target_modules` entry (the regex, if one) matching none of `modules`."""
        if isinstance(self.target, str):
            found = any(re.fullmatch(self.target, m) for m in modules)
            return None if found else self.target
        for entry in self.target or []:
            if not any(_matches([entry], m) for m in modules):
                return entry
        return None

    def rank(self, module: str) -> tuple[int, str | None]:
        """`module`'s rank, and the `rank_pattern` key that gave it (None: `r` did)."""
        found = _first_pattern(self.rank_pattern, module)
        return (self.r, None) if found is None else (self.rank_pattern[found], found)

    def scale(self, module: str) -> float:
        """`alpha / r`, or `alpha / sqrt(r)` with rsLoRA, after both patterns."""
        found = _first_pattern(self.alpha_pattern, module)
        alpha = self.alpha if found is None else float(self.alpha_pattern[found])
        r = self.rank(module)[0]
        return alpha / (math.sqrt(r) if self.rslora else r)


def read_settings(root: Path) -> LoraSettings:
    """Read and check `root`'s `adapter_config.json`.

    Raises `LoadError` naming the file and the field: missing file, not JSON, not an
    object; `peft_type` other than `LORA`; `r` or `lora_alpha` missing or bad; a variant
    or extra that is not plain LoRA (see `_UNSUPPORTED`), a `bias` other than `none`; a
    malformed pattern, target list or regex.
    """
    path = root / ADAPTER_CONFIG
    if not path.is_file():
        raise LoadError(f"{path} is missing: an adapter directory needs {ADAPTER_CONFIG}")
    try:
        config = json.loads(path.read_bytes())
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise LoadError(f"{path} is not a JSON object")
    return _check(path, config)


def _check(path: Path, config: dict[str, Any]) -> LoraSettings:
    def bad(field: str, expected: str) -> LoadError:
        shown = f"is {config[field]!r}" if field in config else "is missing"
        return LoadError(f"{path}: {field} {shown}, expected {expected}")

    if config.get("peft_type") != "LORA":
        raise bad("peft_type", "'LORA' (only LoRA adapters are supported)")
    for field, why in _UNSUPPORTED.items():
        if config.get(field):
            raise LoadError(f"{path}: {field} is {config[field]!r}: {why}")
    if config.get("bias", "none") != "none":
        raise bad("bias", "'none' (trained biases of the base model are not supported)")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise bad(
            "init_lora_weights",
            "one that leaves the base weights alone (this one rewrote them: save the adapter "
            "with path_initial_model_for_weight_conversion to get plain LoRA)",
        )
    r, alpha, rslora = config.get("r"), config.get("lora_alpha"), config.get("use_rslora", False)
    if not _is_rank(r):
        raise bad("r", "a positive integer")
    if not _is_number(alpha):
        raise bad("lora_alpha", "a finite number")
    if not isinstance(rslora, bool):
        raise bad("use_rslora", "true or false")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise bad("base_model_name_or_path", "a string or null")
    layers = config.get("layers_to_transform")
    layers = [layers] if _is_index(layers) else layers
    if layers is not None and not (isinstance(layers, list) and all(map(_is_index, layers))):
        raise bad("layers_to_transform", "a layer index, a list of them, or null")
    return LoraSettings(
        path=path,
        raw=config,
        base_model=base or None,
        r=r,
        alpha=float(alpha),
        rslora=rslora,
        rank_pattern=_patterns(path, config, "rank_pattern", _is_rank, "a positive integer"),
        alpha_pattern=_patterns(path, config, "alpha_pattern", _is_number, "a finite number"),
        target=_names_or_regex(path, config, "target_modules"),
        exclude=_names_or_regex(path, config, "exclude_modules"),
        layers=layers or None,
        layers_pattern=_names(path, config, "layers_pattern") or None,
    )


def _patterns(
    path: Path, config: dict[str, Any], field: str, valid: Callable[[object], bool], what: str
) -> dict[str, Any]:
    value = config.get(field) or {}
    if not isinstance(value, dict):
        raise LoadError(f"{path}: {field} is {value!r}, expected an object of pattern: value")
    for key, item in value.items():
        if not valid(item):
            raise LoadError(f"{path}: {field}[{key!r}] is {item!r}, expected {what}")
        _compile(path, field, rf"(.*\.)?({key})$")
    return value


def _names_or_regex(path: Path, config: dict[str, Any], field: str) -> str | list[str] | None:
    value = config.get(field)
    if field == "target_modules" and isinstance(value, str) and value.lower() == "all-linear":
        return None  # PEFT saves the names it chose; a hand-written shorthand means "any"
    if isinstance(value, str):
        _compile(path, field, value)
        return value
    return _names(path, config, field)


def _names(path: Path, config: dict[str, Any], field: str) -> list[str] | None:
    value = config.get(field)
    if isinstance(value, str):
        return [value] if value else None
    if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise LoadError(f"{path}: {field} is {value!r}, expected a list of names, a regex, or null")


def _compile(path: Path, field: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise LoadError(f"{path}: {field} holds {pattern!r}, not a valid regex ({exc})") from exc


def _first_pattern(patterns: Mapping[str, object], module: str) -> str | None:
    """The first key, in the config's order, that PEFT's `get_pattern_key` matches to
    `module`: a regex matching a whole dotted suffix of the name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _matches(names: str | list[str], module: str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return any(module == name or module.endswith(f".{name}") for name in names)


def _is_rank(value: object) -> TypeGuard[int]:
    return _is_index(value) and value != 0


def _is_index(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
