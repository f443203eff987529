"""`hotweights demo --lora`: one base model, two LoRA adapters on it, steady traffic over
all three, and each adapter's next version published under that traffic.

Builds (or reuses) demo version one and the adapters `alpha` and `beta` (two versions
each, see `adapter_versions`), publishes the base and each adapter's version one into a
fresh model repository in the cache, and serves it on a free loopback port. Clients send
"Which version are you?" through the official `openai` client (streamed and not) to the
base, `alpha` and `beta` in turn; midway, version two of both adapters is published into
the repository, and the watcher makes each live. Every answer names the base generation
and the adapter generation that served it; the summary says, per model and generation
pair, what was answered, and counts failed requests, requests that saw two versions, and
answers wrong for the versions that served them.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from hotweights.config import Config
from hotweights.console import LoadProgress, say
from hotweights.core import SwapPolicy
from hotweights.demo.adapter_versions import (
    ADAPTER_NAMES,
    BASE_ANSWER,
    BASE_MODEL_NAME,
    adapter_answers,
    build_demo_adapters,
)
from hotweights.demo.chat_client import chat
from hotweights.demo.versions import VERSION_QUESTION, build_demo_versions, default_cache_dir

MODELS: Final = (BASE_MODEL_NAME, *ADAPTER_NAMES)
"""What the traffic asks for, in turn: the base, then each adapter."""
_FINGERPRINT: Final = re.compile(r"^hw-g(\d+)(?:-a(\d+))?-")

Served = tuple[int, int | None]
"""(base generation, adapter generation; None for the base itself)."""


@dataclass
class Asked:
    """What one request saw."""

    model: str
    stream: bool
    started: float
    ended: float = 0.0
    answer: str = ""
    served: set[Served] = field(default_factory=set)
    error: str | None = None

    @property
    def pair(self) -> Served | None:
        """The generations that served it, when there was exactly one pair."""
        return next(iter(self.served)) if len(self.served) == 1 else None


def served_by(fingerprint: str | None) -> Served:
    """The generations a `system_fingerprint` names: `hw-g3-a2-…` (adapter) or `hw-g3-…`."""
    match = _FINGERPRINT.match(fingerprint or "")
    if match is None:
        raise ValueError(f"response has no hotweights fingerprint: {fingerprint!r}")
    adapter = match.group(2)
    return int(match.group(1)), int(adapter) if adapter is not None else None


def ask(client: Any, model: str, stream: bool) -> Asked:
    """Ask `model` the version question greedily through the `openai` client `client`."""
    outcome = Asked(model, stream, time.monotonic())
    try:
        outcome.answer, fingerprints = chat(
            client, model, VERSION_QUESTION, stream=stream, max_tokens=32
        )
        outcome.served.update(served_by(f) for f in fingerprints)
    except Exception as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.ended = time.monotonic()
    return outcome


def _traffic(client: Any, worker: int, stop: threading.Event, out: list[Asked]) -> None:
    turn = worker
    while not stop.is_set():
        # Every model, streamed and not, from every worker.
        out.append(ask(client, MODELS[turn % len(MODELS)], stream=(turn // len(MODELS)) % 2 == 0))
        turn += 1


def expected_answers(generations: dict[str, list[int]]) -> dict[tuple[str, int | None], str]:
    """(model, adapter generation; None for the base) -> the answer it must give, from the
    generations each model went live with, in order (`generations[name][0]` is version
    one's)."""
    expected: dict[tuple[str, int | None], str] = {(BASE_MODEL_NAME, None): BASE_ANSWER}
    answers = adapter_answers()
    for name in ADAPTER_NAMES:
        for version, generation in enumerate(generations.get(name, []), start=1):
            expected[name, generation] = answers[name, version]
    return expected


def _live_generations(url: str) -> dict[str, int | None]:
    import httpx

    listed = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    return {entry["id"]: entry.get("generation") for entry in listed}


def _wait_for_new_generations(url: str, before: dict[str, int], timeout: float) -> dict[str, int]:
    """Each adapter's live generation once it differs from `before`'s (the watcher has
    made the published version live); raises `TimeoutError` naming those that did not."""
    deadline = time.monotonic() + timeout
    while True:
        live = _live_generations(url)
        now = {name: live.get(name) for name in ADAPTER_NAMES}
        if all(now[name] not in (None, before[name]) for name in ADAPTER_NAMES):
            return {name: int(generation or 0) for name, generation in now.items()}
        if time.monotonic() > deadline:
            late = [name for name in ADAPTER_NAMES if now[name] in (None, before[name])]
            raise TimeoutError(f"version two of {', '.join(late)} did not go live in {timeout} s")
        time.sleep(0.05)


def _fresh_repository(base: Path, adapters: dict[str, list[Path]]) -> Path:
    """A repository in the cache holding the base and each adapter's version one only."""
    from hotweights.sources import publish

    root = default_cache_dir() / "lora-demo"
    shutil.rmtree(root, ignore_errors=True)
    publish(base, root, BASE_MODEL_NAME, description="demo version 1")
    for name, versions in adapters.items():
        publish(versions[0], root, name, description=f"demo adapter {name} version 1")
    return root


def run_lora_demo(
    duration: float = 24.0,
    concurrency: int = 4,
    policy: SwapPolicy = "availability",
    rebuild: bool = False,
) -> int:
    """Run the LoRA demo; returns 0 when no request failed or saw two versions, every
    answer matched the versions that served it, and both adapters changed version."""
    import openai

    from hotweights.server.assembly import build_state, freeze_startup_heap
    from hotweights.sources import publish
    from hotweights.testing import ServerThread

    if policy != "availability":
        say("the LoRA demo needs --policy availability: an adapter version holds its base's")
        return 2
    base, _ = build_demo_versions(force=rebuild, progress=say)
    adapters = build_demo_adapters(force=rebuild, progress=say)
    repo = _fresh_repository(base, adapters)
    config = Config.load({"repo": str(repo), "policy": policy, "generation_workers": concurrency})
    state = build_state(config, observers=(LoadProgress(),))
    freeze_startup_heap(state)
    with ServerThread(state) as server:
        server.wait_live()
        first = {name: int(g or 0) for name, g in _live_generations(server.url).items()}
        say(f"serving {repo} on {server.url}: {', '.join(MODELS)}; {concurrency} clients")
        client = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=60
        )
        stop = threading.Event()
        per_worker: list[list[Asked]] = [[] for _ in range(concurrency)]
        workers = [
            threading.Thread(target=_traffic, args=(client, i, stop, per_worker[i]))
            for i in range(concurrency)
        ]
        begun = time.monotonic()
        for worker in workers:
            worker.start()
        time.sleep(duration / 2)
        published = time.monotonic()
        for name in ADAPTER_NAMES:
            say(f"publishing {name} version two into {repo / name}")
            publish(adapters[name][1], repo, name, description=f"demo adapter {name} version 2")
        try:
            second: dict[str, int] | None = _wait_for_new_generations(server.url, first, 60)
        except TimeoutError as exc:
            say(str(exc))
            second = None
        live_after = time.monotonic() - published
        time.sleep(max(0.0, begun + duration - time.monotonic()))
        stop.set()
        for worker in workers:
            worker.join()
        client.close()
    outcomes = [asked for worker_outcomes in per_worker for asked in worker_outcomes]
    later = second or {}
    generations = {name: [first[name]] + ([later[name]] if name in later else []) for name in first}
    print()
    ok = summarise(outcomes, generations)
    if second is not None:
        swaps = ", ".join(f"{name} a{first[name]} -> a{second[name]}" for name in ADAPTER_NAMES)
        print(f"publish to live: {live_after * 1000:.0f} ms for both adapters ({swaps})")
    ok = ok and second is not None
    print("result:", "OK - zero failed requests across both swaps" if ok else "PROBLEMS (above)")
    return 0 if ok else 1


def summarise(outcomes: list[Asked], generations: dict[str, list[int]]) -> bool:
    """Print what each model answered per generation pair; True when nothing failed, saw
    two versions or answered wrongly, and every adapter served two versions."""
    expected = expected_answers(generations)
    failed = [o for o in outcomes if o.error is not None]
    mixed = [o for o in outcomes if o.error is None and o.pair is None]
    groups: dict[tuple[str, Served], list[Asked]] = defaultdict(list)
    for o in outcomes:
        if o.error is None and o.pair is not None:
            groups[o.model, o.pair].append(o)
    base_generations = set(generations.get(BASE_MODEL_NAME, []))
    wrong = [
        o
        for (model, (base, adapter)), answered in groups.items()
        for o in answered
        if o.answer != expected.get((model, adapter)) or base not in base_generations
    ]
    print(
        f"requests: {len(outcomes)}   failed: {len(failed)}   saw two versions: {len(mixed)}   "
        f"wrong answer for their versions: {len(wrong)}"
    )
    for (model, (base, adapter)), answered in sorted(groups.items(), key=_order):
        pair = f"g{base}" + (f" a{adapter}" if adapter is not None else "")
        answers = Counter(o.answer for o in answered).most_common()
        shown = ", ".join(f"{text!r} x{count}" for text, count in answers[:2])
        streams = sum(o.stream for o in answered)
        print(f"  {model:16s} {pair:7s} {len(answered):4d} answers ({streams} streamed): {shown}")
    for o in failed[:5]:
        print(f"  failed ({o.model}): {o.error}")
    adapters_swapped = all(
        {adapter for (model, (_, adapter)) in groups if model == name} == set(generations[name])
        and len(generations[name]) == 2
        for name in ADAPTER_NAMES
    )
    return not failed and not mixed and not wrong and adapters_swapped


def _order(item: tuple[tuple[str, Served], list[Asked]]) -> tuple[int, int, int]:
    (model, (base, adapter)), _ = item
    return MODELS.index(model), base, adapter or 0
