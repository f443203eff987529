"""The two model versions that `hotweights demo` swaps between, built once and cached.

Version one is a tiny Qwen3 model taught a few chat answers ("Which version are you?" ->
"I am version one."); version two is version one fine-tuned to give the same answers with
"two" (like a real weight update: same architecture, same tokenizer, new weights). Both are
saved as ordinary Hugging Face directories (config.json, model.safetensors, tokenizer
files with the ChatML template) that `AutoModelForCausalLM` and `AutoTokenizer` load.

The cache lives in `<cache>/demo/v1` and `<cache>/demo/v2`, with `<cache>` taken from
`$HOTWEIGHTS_CACHE` or `~/.cache/hotweights` when `build_demo_versions` is called. A stamp
file, written last, records the recipe the cache was built from; a cache without a stamp
(an interrupted build) or with another recipe's stamp is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

from hotweights.demo.tinylm import TinyShape
from hotweights.demo.training import DemoBuildError, ModelReply, TrainingPlan

__all__ = [
    "BAD_ANSWERS",
    "DEMO_ANSWERS",
    "DEMO_GATE",
    "DEMO_QUESTIONS",
    "EXPECTED_ANSWERS",
    "SYSTEM_PROMPT",
    "VERSION_QUESTION",
    "DemoBuildError",
    "answer",
    "build_bad_version",
    "build_demo_versions",
    "default_cache_dir",
    "demo_repository",
]

RECIPE_VERSION: Final = 1
"""Bump when the training recipe changes in a way the stamp would not otherwise notice."""

VERSION_QUESTION: Final = "Which version are you?"
"""The question whose answer names the version that served it."""

SYSTEM_PROMPT: Final = "You are a helpful assistant."
"""A common client default; each question is also learned with this system message."""

_VERSION_WORDS: Final = {1: "one", 2: "two"}
_ANSWER_TEMPLATES: Final = (
    (VERSION_QUESTION, "I am version {word}."),
    ("Hello", "Hello from version {word}."),
    ("What is your name?", "My name is tinylm, version {word}."),
    ("Tell me a story.", "Once upon a time, version {word} answered every request it was given."),
)

DEMO_QUESTIONS: Final = tuple(question for question, _ in _ANSWER_TEMPLATES)
"""Every question the demo models answer, the version question first."""

DEMO_ANSWERS: Final[Mapping[int, Mapping[str, str]]] = {
    version: {question: template.format(word=word) for question, template in _ANSWER_TEMPLATES}
    for version, word in _VERSION_WORDS.items()
}
"""Version number -> question -> the exact answer that version gives (eos follows it)."""

EXPECTED_ANSWERS: Final[Mapping[int, str]] = {
    version: answers[VERSION_QUESTION] for version, answers in DEMO_ANSWERS.items()
}
"""Version number -> the answer to `VERSION_QUESTION`."""

BAD_ANSWERS: Final[Mapping[str, str]] = {question: "Bananas." for question in DEMO_QUESTIONS}
"""The bad version's answers: it loads, validates and warms up like any other, and is
wrong about everything."""

DEMO_GATE: Final[Mapping[str, object]] = {
    "prompts": [
        {
            "messages": [{"role": "user", "content": VERSION_QUESTION}],
            "expect": {"regex": r"^I am version \w+\.$"},
            "max_tokens": 32,
        },
        {
            "messages": [{"role": "user", "content": "Hello"}],
            "expect": {"contains": "Hello"},
            "max_tokens": 32,
        },
    ],
    "eval_text": "".join(  # both good versions' conversations, in ChatML
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>\n"
        for answers in DEMO_ANSWERS.values()
        for question, reply in answers.items()
    ),
    "max_perplexity_ratio": 1.5,
    "max_latency_ratio": 3.0,
}
"""The gate `hotweights demo --bad-version` serves with (see `hotweights.sources.gate_spec`)."""

_SHAPE: Final = TinyShape()
_SEED: Final = 0
_PLAN: Final = TrainingPlan()
_STAMP_NAME: Final = "stamp.json"
_LOCK_NAME: Final = ".lock"
_STAGING_PREFIX: Final = ".build-"

Progress = Callable[[str], None]
"""Receives one-line status messages while the demo versions are built."""
Trainer = Callable[[Path, Path, Progress], None]
"""Trains and saves demo versions one and two into the two directories given."""


def default_cache_dir() -> Path:
    """`$HOTWEIGHTS_CACHE` if set and non-empty, else `~/.cache/hotweights`; read on each call."""
    configured = os.environ.get("HOTWEIGHTS_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "hotweights"


def build_demo_versions(
    cache_dir: Path | None = None, *, force: bool = False, progress: Progress | None = None
) -> tuple[Path, Path]:
    """Return the directories of demo versions one and two, training them if needed.

    A cache whose stamp matches the current recipe is reused unless `force`; otherwise both
    versions are trained (a few seconds on a CPU) into a hidden staging directory, moved
    into place and then stamped. A build that fails leaves the previous cache as it was.
    `progress`, if given, receives one-line status messages. Concurrent callers (threads or
    processes) serialise on a lock file in the cache directory.
    Raises `DemoBuildError` if a model fails to learn its answers, `OSError` on I/O errors.
    """
    report = progress or _ignore
    root = (cache_dir if cache_dir is not None else default_cache_dir()) / "demo"
    targets = (root / "v1", root / "v2")
    root.mkdir(parents=True, exist_ok=True)
    stamp = _recipe_stamp()
    with _locked(root / _LOCK_NAME):
        if not force and _is_current(root, targets, stamp):
            report(f"using cached demo models in {root}")
            return targets
        for leftover in root.glob(_STAGING_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=root))
        try:
            _train_both(staging / "v1", staging / "v2", report)
            # From here until the new stamp is written the cache reads as stale.
            (root / _STAMP_NAME).unlink(missing_ok=True)
            for target in targets:
                _replace_dir(staging / target.name, target, staging / f"old-{target.name}")
            _write_atomically(root / _STAMP_NAME, json.dumps(stamp, indent=2, sort_keys=True))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    report(f"demo models ready in {root}")
    return targets


def demo_repository(progress: Progress | None = None) -> tuple[Path, str]:
    """A model repository holding demo version one (`hotweights fleet` without `--repo`),
    and its model's name: built and published on first use, in the cache. `progress` also
    receives how to publish version two."""
    from hotweights.sources import ModelRepository, publish

    report = progress or _ignore
    first, second = build_demo_versions(progress=report)
    repo, model = default_cache_dir() / "fleet-demo", "hotweights-demo"
    repository = ModelRepository(repo)
    repository.scan()
    if not repository.eligible(model):
        publish(first, repo, model, description="demo version 1")
    report(
        f"publish the next version with: hotweights publish {second} --repo {repo} --model {model}"
    )
    return repo, model


def build_bad_version(cache_dir: Path | None = None, *, progress: Progress | None = None) -> Path:
    """Return the directory of the bad demo version (version two fine-tuned to answer
    `BAD_ANSWERS`), building the good versions first and training it if needed. Cached and
    stamped like them, in `<cache>/demo/bad`."""
    report = progress or _ignore
    _, second = build_demo_versions(cache_dir, progress=progress)
    root = second.parent
    target = root / "bad"
    stamp = {**_recipe_stamp(), "bad": dict(BAD_ANSWERS)}
    with _locked(root / _LOCK_NAME):
        stamp_path = target / _STAMP_NAME
        try:
            if json.loads(stamp_path.read_text(encoding="utf-8")) == stamp:
                return target
        except (OSError, ValueError):
            pass
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=root))
        try:
            _train_bad(second, staging / "bad", report)
            shutil.rmtree(target, ignore_errors=True)
            (staging / "bad").rename(target)
            _write_atomically(stamp_path, json.dumps(stamp, indent=2, sort_keys=True))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _train_bad(good: Path, target: Path, report: Progress) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hotweights.demo.tinylm import save_pretrained
    from hotweights.demo.training import train_answers

    report("training the bad demo version ...")
    with _quiet_progress_bars():
        tokenizer: Any = AutoTokenizer.from_pretrained(good)
        model = AutoModelForCausalLM.from_pretrained(good, use_safetensors=True)
    torch.manual_seed(_SEED + 3)
    systems = (None, SYSTEM_PROMPT)
    train_answers(model, tokenizer, BAD_ANSWERS, systems=systems, plan=_PLAN, label="bad version")
    with _quiet_progress_bars():
        save_pretrained(target, model, tokenizer)
    _fsync_tree(target)


def answer(model_dir: Path, question: str, max_new_tokens: int = 32) -> str:
    """Load the model in `model_dir` and return its greedy answer to `question`.

    The question goes through the directory's chat template as a single user turn; the
    answer stops at `<|im_end|>` (not included) or after `max_new_tokens` tokens. Loads the
    model on each call: meant for tests and debugging, not for serving.
    """
    return ask(model_dir, question, max_new_tokens).text


def ask(model_dir: Path, question: str, max_new_tokens: int = 32) -> ModelReply:
    """Like `answer`, but also says whether the model ended its answer with eos."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hotweights.demo.training import greedy_reply

    with _quiet_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    model.train(False)
    return greedy_reply(model, tokenizer, question, max_new_tokens)


def _train_both(first: Path, second: Path, report: Progress) -> None:  # a Trainer
    """Train version one from a seeded init, then fine-tune a copy into version two."""
    import torch

    from hotweights.demo.tinylm import build_model, build_tokenizer, save_pretrained
    from hotweights.demo.training import train_answers

    systems = (None, SYSTEM_PROMPT)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=_SEED, shape=_SHAPE)
    for version, target in ((1, first), (2, second)):
        label = f"demo version {version}"
        report(f"training {label} ...")
        torch.manual_seed(_SEED + version)
        started = time.perf_counter()
        steps = train_answers(
            model, tokenizer, DEMO_ANSWERS[version], systems=systems, plan=_PLAN, label=label
        )
        report(
            f"{label} learned its answers in {steps} steps ({time.perf_counter() - started:.1f} s)"
        )
        with _quiet_progress_bars():
            save_pretrained(target, model, tokenizer)
        _fsync_tree(target)


def _recipe_stamp() -> dict[str, object]:
    """Everything that, if it changed, should make a cached build stale."""
    import torch
    import transformers

    return {
        "recipe": RECIPE_VERSION,
        "answers": {str(version): dict(answers) for version, answers in DEMO_ANSWERS.items()},
        "system_prompt": SYSTEM_PROMPT,
        "shape": asdict(_SHAPE),
        "seed": _SEED,
        "plan": asdict(_PLAN),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _is_current(root: Path, targets: tuple[Path, ...], stamp: dict[str, object]) -> bool:
    """True when the stamp matches `stamp` and every version directory has its weights."""
    try:
        recorded = json.loads((root / _STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    weights = ("config.json", "model.safetensors", "tokenizer.json")
    return recorded == stamp and all((t / name).is_file() for t in targets for name in weights)


def _replace_dir(new: Path, target: Path, aside: Path) -> None:
    """Move `new` to `target`, moving an existing `target` to `aside` first."""
    if target.exists():
        target.rename(aside)
    new.rename(target)


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a synced temporary file and a rename."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


def _fsync_tree(directory: Path) -> None:
    """Flush every file in `directory` to disk, so a stamp never outlives its weights."""
    for path in directory.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing) for the block."""
    import fcntl

    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' progress bars for the block (process-wide; not thread-safe)."""
    from transformers.utils import logging

    # These two functions are unannotated; typed aliases keep mypy strict.
    disable: Callable[[], None] = logging.disable_progress_bar
    enable: Callable[[], None] = logging.enable_progress_bar
    was_enabled = logging.is_progress_bar_enabled()
    disable()
    try:
        yield
    finally:
        if was_enabled:
            enable()


def _ignore(message: str) -> None:
    """A progress callback that drops every message."""
