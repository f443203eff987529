"""The LoRA adapters that `hotweights demo --lora` serves on demo version one, built once
and cached.

Two adapters, `alpha` and `beta`, each in two versions, are trained with PEFT on the frozen
weights of demo version one so that each answers `VERSION_QUESTION` in its own words
("I am alpha one.", "I am alpha two.", "I am beta one.", "I am beta two."), while the base,
with no adapter, still answers "I am version one.". Version two of an adapter is its version
one trained further (like a real adapter update: same rank, same target modules, new
weights). Each version is an ordinary PEFT directory (`adapter_config.json` naming the demo
model as its base, `adapter_model.safetensors`), as a model repository holds it.

The cache lives in `<cache>/demo-lora/<adapter>/<n>/`, beside the demo versions in
`<cache>/demo/`. Like theirs, its stamp is written last and records the recipe, including
a digest of the base's weights: a rebuilt base rebuilds the adapters.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from hotweights.demo.training import DemoBuildError, ModelReply
from hotweights.demo.versions import (
    _LOCK_NAME,
    _STAGING_PREFIX,
    _STAMP_NAME,
    EXPECTED_ANSWERS,
    SYSTEM_PROMPT,
    VERSION_QUESTION,
    Progress,
    _fsync_tree,
    _ignore,
    _locked,
    _quiet_progress_bars,
    _replace_dir,
    _write_atomically,
    build_demo_versions,
    default_cache_dir,
)

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = [
    "ADAPTER_NAMES",
    "ADAPTER_VERSIONS",
    "BASE_ANSWER",
    "BASE_MODEL_NAME",
    "AdapterReplies",
    "adapter_answers",
    "build_demo_adapters",
    "peft_replies",
]

RECIPE_VERSION: Final = 1
"""Bump when the adapters' recipe changes in a way the stamp would not otherwise notice."""

BASE_MODEL_NAME: Final = "hotweights-demo"
"""The name the demo serves its model as; each adapter's `base_model_name_or_path`."""

ADAPTER_NAMES: Final = ("alpha", "beta")
"""The demo's adapters, in the order they are built."""

ADAPTER_VERSIONS: Final = (1, 2)
"""The versions each adapter is built in."""

BASE_ANSWER: Final = EXPECTED_ANSWERS[1]
"""What the base (demo version one, no adapter) answers to `VERSION_QUESTION`."""

LORA_RANK: Final = 8
LORA_ALPHA: Final = 16
TARGET_MODULES: Final = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""Every attention and MLP projection of a Qwen3 decoder layer."""

_VERSION_WORDS: Final = {1: "one", 2: "two"}
_SEED: Final = 10
_LEARNING_RATE: Final = 2e-2
_MAX_STEPS: Final = 400
_MIN_MARGIN: Final = 0.5
"""Logits by which each answer token must lead its runner-up before training stops. Not a
probability, as for the base: the final norm and the tied output head stay frozen, so a
letter the base never wrote ("b") cannot get more than a few percent of the mass, yet can
lead by about one logit, which no numerical difference between engines overturns."""
_ADAPTER_FILES: Final = ("adapter_config.json", "adapter_model.safetensors")


def adapter_answers() -> dict[tuple[str, int], str]:
    """(adapter, version) -> the exact answer that adapter version gives to `VERSION_QUESTION`."""
    return {
        (name, version): f"I am {name} {_VERSION_WORDS[version]}."
        for name in ADAPTER_NAMES
        for version in ADAPTER_VERSIONS
    }


def build_demo_adapters(
    cache_dir: Path | None = None, *, force: bool = False, progress: Progress | None = None
) -> dict[str, list[Path]]:
    """Return adapter name -> its version directories (version one first), training them if
    needed on demo version one (itself built if needed, see `build_demo_versions`).

    A cache whose stamp matches the current recipe and base is reused unless `force`;
    otherwise all four versions are trained (a few seconds on a CPU) into a hidden staging
    directory, moved into place and then stamped. A build that fails leaves the previous
    cache as it was. Concurrent callers serialise on a lock file in `<cache>/demo-lora`.
    Raises `DemoBuildError` if an adapter fails to learn its answer, `OSError` on I/O errors.
    """
    report = progress or _ignore
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    base, _ = build_demo_versions(cache, progress=report)
    root = cache / "demo-lora"
    targets = {name: [root / name / str(v) for v in ADAPTER_VERSIONS] for name in ADAPTER_NAMES}
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / _LOCK_NAME):
        stamp = _recipe_stamp(base)
        if not force and _is_current(root, targets, stamp):
            report(f"using cached demo adapters in {root}")
            return targets
        for leftover in root.glob(_STAGING_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=root))
        try:
            for name in ADAPTER_NAMES:
                _train_adapter(base, name, staging / name, report)
            # From here until the new stamp is written the cache reads as stale.
            (root / _STAMP_NAME).unlink(missing_ok=True)
            for name in ADAPTER_NAMES:
                _replace_dir(staging / name, root / name, staging / f"old-{name}")
            _write_atomically(root / _STAMP_NAME, json.dumps(stamp, indent=2, sort_keys=True))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    report(f"demo adapters ready in {root}")
    return targets


@dataclass(frozen=True)
class AdapterReplies:
    """Greedy replies to one question through PEFT in-process: the base's and each
    adapter version's."""

    base: ModelReply
    """The reply with every adapter disabled."""
    adapters: Mapping[tuple[str, int], ModelReply]
    """(adapter, version) -> its reply."""

    def wrong(self) -> list[str]:
        """What differs from `BASE_ANSWER` and `adapter_answers()`, one line each; empty
        when every reply is its expected answer followed by eos."""
        wrong = (
            []
            if self.base == ModelReply(BASE_ANSWER, finished=True)
            else [f"base: {self.base!r}, expected {BASE_ANSWER!r}"]
        )
        expected = adapter_answers()
        return wrong + [
            f"{name} v{version}: {reply!r}, expected {expected[name, version]!r}"
            for (name, version), reply in self.adapters.items()
            if reply != ModelReply(expected[name, version], finished=True)
        ]


def peft_replies(
    base_dir: Path,
    adapters: Mapping[str, Sequence[Path]],
    question: str = VERSION_QUESTION,
    max_new_tokens: int = 32,
) -> AdapterReplies:
    """Load the model in `base_dir`, every adapter version in `adapters` (name -> version
    directories, version one first) into one PEFT model, and decode `question` greedily
    with each adapter active and with none. Meant for tests and debugging, not serving."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hotweights.demo.training import greedy_reply

    with _quiet_progress_bars():
        tokenizer: Any = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True)
    # The PEFT model forwards like the transformers model it wraps; greedy_reply takes that.
    peft_model: Any = None
    replies: dict[tuple[str, int], ModelReply] = {}
    for name, directories in adapters.items():
        for version, directory in enumerate(directories, start=1):
            peft_model = _add_adapter(peft_model, model, directory, f"{name}-{version}")
            peft_model.set_adapter(f"{name}-{version}")
            peft_model.train(False)
            replies[name, version] = greedy_reply(peft_model, tokenizer, question, max_new_tokens)
    if peft_model is None:
        model.train(False)
        base = greedy_reply(model, tokenizer, question, max_new_tokens)
    else:
        with peft_model.disable_adapter():
            base = greedy_reply(peft_model, tokenizer, question, max_new_tokens)
    return AdapterReplies(base, replies)


def _add_adapter(peft_model: PeftModel | None, model: Any, directory: Path, name: str) -> PeftModel:
    """Load the adapter in `directory` as `name`: into `peft_model`, or wrapping `model`."""
    from peft import PeftModel

    if peft_model is None:
        with _transformers_deprecations_hidden():
            loaded: PeftModel = PeftModel.from_pretrained(model, directory, adapter_name=name)
        return loaded
    peft_model.load_adapter(directory, adapter_name=name)
    return peft_model


def _train_adapter(base: Path, name: str, target: Path, report: Progress) -> None:
    """Train adapter `name`'s versions on `base` in turn, saving each to `target/<n>`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_progress_bars():
        tokenizer: Any = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=list(TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(_SEED + ADAPTER_NAMES.index(name))  # A's random init; B starts at zero
    with _transformers_deprecations_hidden():
        peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = BASE_MODEL_NAME
    answers = adapter_answers()
    for version in ADAPTER_VERSIONS:
        label = f"adapter {name} version {version}"
        report(f"training {label} ...")
        started = time.perf_counter()
        steps = _learn(peft_model, tokenizer, answers[name, version], label)
        report(
            f"{label} learned its answer in {steps} steps ({time.perf_counter() - started:.1f} s)"
        )
        _save_adapter(peft_model, target / str(version))


def _learn(model: Any, tokenizer: Any, answer: str, label: str) -> int:
    """Train `model`'s adapter until, with and without the system prompt, every token of
    `answer` plus eos leads its runner-up by `_MIN_MARGIN` (teacher-forced) and greedy
    decoding reproduces it. Returns the optimiser steps taken; leaves `model` in eval mode.
    Raises `DemoBuildError` naming `label` after `_MAX_STEPS`."""
    import torch

    from hotweights.demo.training import IGNORE_INDEX, _encode_batch, greedy_reply

    systems = (None, SYSTEM_PROMPT)
    input_ids, attention_mask, labels = _encode_batch(
        tokenizer, {VERSION_QUESTION: answer}, systems
    )
    targets = labels[:, 1:]  # [conversations, longest - 1]: token t predicts token t + 1
    scored = targets != IGNORE_INDEX
    wanted = targets[scored].unsqueeze(-1)  # [answer tokens, 1]
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=_LEARNING_RATE, weight_decay=0.0)
    margin = float("-inf")
    for step in range(_MAX_STEPS + 1):
        model.train()
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        answer_logits = logits[scored].float()  # [answer tokens, vocab]
        chosen = answer_logits.gather(-1, wanted).squeeze(-1)  # [answer tokens]
        rivals = answer_logits.scatter(-1, wanted, float("-inf")).amax(-1)  # [answer tokens]
        margin = float((chosen - rivals).min().detach())
        if margin >= _MIN_MARGIN:
            model.train(False)
            expected = ModelReply(answer, finished=True)
            if all(
                greedy_reply(model, tokenizer, VERSION_QUESTION, system=system) == expected
                for system in systems
            ):
                return step
        if step == _MAX_STEPS:
            break
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(answer_logits, wanted.squeeze(-1))
        torch.autograd.backward(loss)
        optimizer.step()
    model.train(False)
    raise DemoBuildError(
        f"{label} did not learn {answer!r} within {_MAX_STEPS} steps "
        f"(smallest lead of an answer token over its rival: {margin:.2f} logits, "
        f"{_MIN_MARGIN} wanted)"
    )


def _save_adapter(peft_model: PeftModel, directory: Path) -> None:
    """Write the adapter's two files, and nothing else, into `directory`."""
    # Not "auto": that looks the base's name up on the Hugging Face hub.
    peft_model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
    for path in directory.iterdir():
        if path.name not in _ADAPTER_FILES:
            path.unlink()
    missing = [name for name in _ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise DemoBuildError(f"PEFT did not write {', '.join(missing)} into {directory}")
    _fsync_tree(directory)


@contextmanager
def _transformers_deprecations_hidden() -> Iterator[None]:
    """Hide the FutureWarning that PEFT's wrapping triggers in transformers 5
    (`is_gradient_checkpointing`); process-wide for the block, not thread-safe."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        yield


def _recipe_stamp(base: Path) -> dict[str, object]:
    """Everything that, if it changed, should make the cached adapters stale."""
    import peft
    import torch
    import transformers

    return {
        "recipe": RECIPE_VERSION,
        "base_weights_sha256": hashlib.sha256(
            (base / "model.safetensors").read_bytes()
        ).hexdigest(),
        "base_model_name": BASE_MODEL_NAME,
        "answers": {
            f"{name}/{version}": text for (name, version), text in adapter_answers().items()
        },
        "question": VERSION_QUESTION,
        "system_prompt": SYSTEM_PROMPT,
        "rank": LORA_RANK,
        "alpha": LORA_ALPHA,
        "target_modules": list(TARGET_MODULES),
        "seed": _SEED,
        "learning_rate": _LEARNING_RATE,
        "max_steps": _MAX_STEPS,
        "min_margin": _MIN_MARGIN,
        "peft": peft.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _is_current(root: Path, targets: Mapping[str, list[Path]], stamp: dict[str, object]) -> bool:
    """True when the stamp matches `stamp` and every version directory has its files."""
    try:
        recorded = json.loads((root / _STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    directories = [directory for versions in targets.values() for directory in versions]
    return recorded == stamp and all(
        (directory / name).is_file() for directory in directories for name in _ADAPTER_FILES
    )
