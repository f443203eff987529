"""Reading and checking a PEFT LoRA adapter directory.

An adapter directory is what PEFT's `save_pretrained` writes: `adapter_config.json` and
`adapter_model.safetensors` (or, refused unless opted in, the pickle `adapter_model.bin`).
Each adapted linear layer `name` of the base model is two tensors,
`base_model.model.<name>.lora_A.weight` (rank, in_features) and `...lora_B.weight`
(out_features, rank), and adds `scale * B(A(x))` to that layer's output.

`read_adapter` returns only what that formula needs and refuses, with a `LoadError` naming
the file and the field, every adapter it would serve wrongly: a config that is not plain
LoRA (`lora_settings` checks it), embedding LoRA, full weights beside the low-rank ones,
tensors that disagree with their config. Values are not checked for being finite: the
loader's validation does that. Functions here hold no state and are thread-safe.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hotweights.backends.lora_settings import ADAPTER_CONFIG, LoraSettings, read_settings
from hotweights.backends.safetensors_header import read_header
from hotweights.errors import LoadError

__all__ = [
    "ADAPTER_CONFIG",
    "AdapterFiles",
    "LoraPair",
    "check_fits",
    "estimate_bytes",
    "is_adapter_dir",
    "read_adapter",
    "read_adapter_config",
]

ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
"""PEFT prefixes every saved key with the path of the base model inside its wrapper."""

# `<module>.lora_A.weight`, or `<module>.lora_A.<adapter name>.weight` as in a PEFT model's
# own state dict (its save_pretrained strips the name; other tools may not).
_PAIR_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<side>[AB])(?:\.(?P<infix>[^.]+))?\.weight")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class LoraPair:
    """One adapted linear layer: `y += scale * (x @ a.T) @ b.T`."""

    a: torch.Tensor
    """(rank, in_features), as saved (`lora_A.weight`)."""
    b: torch.Tensor
    """(out_features, rank), as saved (`lora_B.weight`)."""
    scale: float
    """`lora_alpha / rank`, or `lora_alpha / sqrt(rank)` with `use_rslora`, after
    `rank_pattern` and `alpha_pattern` as PEFT applies them to this module."""


@dataclass(frozen=True)
class AdapterFiles:
    """A checked adapter directory, its tensors on the CPU in their saved dtype."""

    path: Path
    base_model: str | None
    """`base_model_name_or_path` from the config; None when absent or empty."""
    pairs: dict[str, LoraPair]
    """Keyed by the module's name in the base model, e.g. `model.layers.0.self_attn.q_proj`."""
    nbytes: int
    """Bytes of all tensors."""
    fingerprint: str
    """sha256 hex of the config's and the weights file's bytes: equal content, equal value."""


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a directory holding `adapter_config.json`. Reads nothing."""
    try:
        return (Path(path) / ADAPTER_CONFIG).is_file()
    except OSError:
        return False


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The parsed `adapter_config.json` of the adapter directory `path`, checked.

    Reads no tensors. Raises `LoadError` naming the file and the field for everything
    `read_adapter` refuses on the config alone (see the module docstring).
    """
    return read_settings(_root(path)).raw


def read_adapter(path: str | Path, *, allow_pickle: bool = False) -> AdapterFiles:
    """Read and check the adapter directory `path`; tensors load on the CPU as saved.

    Raises `LoadError` naming the file and the field when the directory, the config or the
    weights are missing or malformed, when the adapter is not plain LoRA on linear layers
    (embedding LoRA, DoRA, biases, full weights), when a tensor is not a 2-D float, when an
    A lacks its B or the other way, and when the config's `r` (after `rank_pattern`) or
    `target_modules` disagree with the tensors. `adapter_model.bin` (pickle) is refused
    unless `allow_pickle`, and then loaded with `torch.load(weights_only=True)`.
    """
    root = _root(path)
    settings = read_settings(root)
    weights = _weights_file(root, allow_pickle=allow_pickle)
    tensors = _load_tensors(weights)
    pairs = _pairs(weights, tensors)
    _check_against_config(settings, weights, pairs)
    scaled = {name: LoraPair(a, b, settings.scale(name)) for name, (a, b) in sorted(pairs.items())}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    fingerprint = _fingerprint(settings.path, weights)
    return AdapterFiles(root, settings.base_model, scaled, nbytes, fingerprint)


def check_fits(adapter: AdapterFiles, linears: Mapping[str, tuple[int, int]]) -> None:
    """Check every adapted module against the base model's linear layers.

    `linears` maps every `nn.Linear` of the base model, by module name, to
    `(in_features, out_features)`. Raises `LoadError` naming the adapter path, each module
    that the base lacks or has as something other than a Linear, and each whose expected
    (base) and found (adapter) shapes differ.
    """
    problems: list[str] = []
    for name, pair in sorted(adapter.pairs.items()):
        found = (int(pair.a.shape[1]), int(pair.b.shape[0]))
        expected = linears.get(name)
        if expected is None:
            problems.append(
                f"module {name!r} is not an nn.Linear of the base model (the base lacks it, "
                f"or it is another kind of module there); the adapter needs (in_features, "
                f"out_features) = {found}"
            )
        elif tuple(expected) != found:
            problems.append(
                f"module {name!r}: the base's Linear has (in_features, out_features) = "
                f"{tuple(expected)}, the adapter's lora_A {list(pair.a.shape)} and lora_B "
                f"{list(pair.b.shape)} need {found}"
            )
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise LoadError(
            f"adapter {adapter.path} does not fit the base model: {'; '.join(problems[:5])}{more}"
        )


def estimate_bytes(path: str | Path) -> int:
    """Bytes of the adapter's tensors, from the safetensors header without reading them
    (the file's size for pickle weights). Raises `LoadError` naming a missing or corrupt
    weights file."""
    weights = _weights_file(_root(path), allow_pickle=True)
    if weights.name == ADAPTER_SAFETENSORS:
        return read_header(weights).tensor_bytes
    try:
        return weights.stat().st_size
    except OSError as exc:
        raise LoadError(f"cannot read {weights}: {exc}") from exc


def _root(path: str | Path) -> Path:
    root = Path(path)
    if not root.exists():
        raise LoadError(f"adapter path {root} does not exist")
    if not root.is_dir():
        raise LoadError(f"adapter path {root} is not a directory (expected a PEFT adapter)")
    return root


# -- the tensors -----------------------------------------------------------------------


def _weights_file(root: Path, *, allow_pickle: bool) -> Path:
    safetensors = root / ADAPTER_SAFETENSORS
    if safetensors.is_file():
        return safetensors
    pickle = root / ADAPTER_PICKLE
    if not pickle.is_file():
        raise LoadError(f"{safetensors} is missing: an adapter directory needs its weights")
    if not allow_pickle:
        raise LoadError(
            f"refusing {pickle}: pickle-based weights can run arbitrary code when loaded; "
            f"convert them to {ADAPTER_SAFETENSORS}, or opt in with allow_pickle"
        )
    return pickle


def _load_tensors(weights: Path) -> dict[str, torch.Tensor]:
    # Any failure of the readers (SafetensorError, UnpicklingError, RuntimeError...) is a
    # file we cannot use; the cause stays chained.
    if weights.name == ADAPTER_SAFETENSORS:
        read_header(weights)  # a clear message for a truncated or corrupt file
        from safetensors.torch import load_file

        try:
            loaded: object = load_file(str(weights), device="cpu")
        except Exception as exc:
            raise LoadError(f"cannot read {weights}: {exc}") from exc
    else:
        try:
            loaded = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise LoadError(f"cannot read {weights}: {exc}") from exc
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise LoadError(f"{weights} is not a mapping of tensor names to tensors")
    return loaded


def _pairs(
    weights: Path, tensors: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    sides: dict[str, dict[str, torch.Tensor]] = {}
    infixes: set[str | None] = set()
    for key, tensor in tensors.items():
        match = _PAIR_KEY.fullmatch(key.removeprefix(KEY_PREFIX))
        if not key.startswith(KEY_PREFIX) or match is None:
            raise LoadError(f"{weights}: tensor {key!r} {_why_not_a_pair(key)}")
        if tensor.dim() != 2:
            raise LoadError(
                f"{weights}: tensor {key!r} has shape {list(tensor.shape)}, expected 2-D"
            )
        if not tensor.is_floating_point():
            raise LoadError(f"{weights}: tensor {key!r} has dtype {tensor.dtype}, expected a float")
        infixes.add(match["infix"])
        sides.setdefault(match["module"], {})[match["side"]] = tensor
    if len(infixes) > 1:
        names = ", ".join(sorted("no name" if i is None else repr(i) for i in infixes))
        raise LoadError(f"{weights}: keys name several adapters ({names}), expected one")
    if not sides:
        raise LoadError(
            f"{weights} holds no LoRA tensors (expected *.lora_A.weight, *.lora_B.weight)"
        )
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, found in sides.items():
        for side, other in (("A", "B"), ("B", "A")):
            if side not in found:
                raise LoadError(
                    f"{weights}: module {module!r} has lora_{other}.weight but no "
                    f"lora_{side}.weight"
                )
        a, b = found["A"], found["B"]
        if a.shape[0] != b.shape[1]:
            raise LoadError(
                f"{weights}: module {module!r} has lora_A.weight {list(a.shape)} and "
                f"lora_B.weight {list(b.shape)}, expected (rank, in) and (out, rank), one rank"
            )
        pairs[module] = (a, b)
    return pairs


def _why_not_a_pair(key: str) -> str:
    if not key.startswith(KEY_PREFIX):
        return f"does not start with {KEY_PREFIX!r}, as PEFT's adapter keys do"
    if ".lora_embedding_" in key:
        return "is LoRA on an embedding: embeddings are not supported, only linear layers"
    if "lora_magnitude_vector" in key:
        return "is a DoRA magnitude: DoRA is not supported"
    if ".lora_B." in key and key.endswith(".bias"):
        return "is a lora_B bias: lora_bias is not supported"
    return "is not a lora_A/lora_B weight (full weights are not a low-rank update)"


def _check_against_config(
    settings: LoraSettings, weights: Path, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    config = settings.path
    for module, (a, _) in sorted(pairs.items()):
        if not settings.targets(module):
            limits = ", ".join(
                f"{field} {value!r}"
                for field, value in (
                    ("target_modules", settings.target),
                    ("exclude_modules", settings.exclude),
                    ("layers_to_transform", settings.layers),
                )
                if value is not None
            )
            raise LoadError(
                f"{weights}: module {module!r} has LoRA tensors, but {config} does not target "
                f"it ({limits})"
            )
        rank, pattern = settings.rank(module)
        if int(a.shape[0]) != rank:
            said = (
                f"r is {rank} and no rank_pattern entry matches module {module!r}"
                if pattern is None
                else f"rank_pattern[{pattern!r}] gives module {module!r} rank {rank}"
            )
            raise LoadError(
                f"{config}: {said}, but its lora_A.weight in {weights} has shape "
                f"{list(a.shape)} (rank {a.shape[0]})"
            )
    unmatched = settings.unmatched_target(sorted(pairs))
    if unmatched is not None:
        raise LoadError(
            f"{config}: target_modules entry {unmatched!r} matches no module with LoRA "
            f"tensors in {weights}"
        )


def _fingerprint(config: Path, weights: Path) -> str:
    digest = hashlib.sha256(b"hotweights-adapter-v1\0")
    for path in (config, weights):
        try:
            size = path.stat().st_size
            digest.update(f"{path.name}\0{size}\0".encode())
            with path.open("rb") as stream:
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
        except OSError as exc:
            raise LoadError(f"cannot read {path}: {exc}") from exc
    return digest.hexdigest()
