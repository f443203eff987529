"""`hotweights demo`: two tiny model versions, a server, steady traffic, a live swap.

Builds (or reuses) the two demo versions, serves version one on a free loopback port,
sends a steady stream of chat requests through the official `openai` client (streamed
and not), makes version two live midway through the admin API, and prints what every
request saw: answers per generation, failures, latency before, during and after the swap.

With `bad_version`, the server runs with the demo's quality gate, and a third version that
loads fine but answers wrongly is published first: the gate refuses it, with every check's
figure, while the traffic keeps its answers from version one.
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotweights.config import Config
from hotweights.console import LoadProgress, say
from hotweights.core import SwapPolicy
from hotweights.core.gate import GateCheck, GateVerdict
from hotweights.demo.chat_client import chat
from hotweights.demo.versions import (
    DEMO_GATE,
    DEMO_QUESTIONS,
    EXPECTED_ANSWERS,
    build_bad_version,
    build_demo_versions,
)

MODEL_NAME = "hotweights-demo"
_FINGERPRINT = re.compile(r"^hw-g(\d+)-")


@dataclass
class Answered:
    """What one request saw."""

    started: float
    ended: float
    stream: bool
    question: str
    answer: str = ""
    generations: set[int] = field(default_factory=set)
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.ended - self.started

    @property
    def generation(self) -> int | None:
        return next(iter(self.generations)) if len(self.generations) == 1 else None


def _generation(fingerprint: str | None) -> int:
    match = _FINGERPRINT.match(fingerprint or "")
    if match is None:
        raise ValueError(f"response has no hotweights fingerprint: {fingerprint!r}")
    return int(match.group(1))


def _ask(client: Any, question: str, stream: bool) -> Answered:
    started = time.monotonic()
    outcome = Answered(started, started, stream, question)
    try:
        outcome.answer, fingerprints = chat(
            client, MODEL_NAME, question, stream=stream, max_tokens=96
        )
        outcome.generations.update(_generation(f) for f in fingerprints)
    except Exception as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.ended = time.monotonic()
    return outcome


def _traffic(client: Any, worker: int, stop: threading.Event, out: list[Answered]) -> None:
    turn = worker
    while not stop.is_set():
        # Mostly the version question (it names its version), with the others mixed in.
        question = (
            DEMO_QUESTIONS[turn % len(DEMO_QUESTIONS)] if turn % 3 == 0 else DEMO_QUESTIONS[0]
        )
        out.append(_ask(client, question, stream=turn % 2 == 0))
        turn += 1


def _percentiles(latencies: list[float]) -> str:
    if not latencies:
        return "        -         -     0"
    ordered = sorted(latencies)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"{p50 * 1000:7.1f} ms {p99 * 1000:7.1f} ms {len(ordered):5d}"


def run_demo(
    duration: float = 24.0,
    concurrency: int = 4,
    policy: SwapPolicy = "availability",
    rebuild: bool = False,
    bad_version: bool = False,
    lora: bool = False,
) -> int:
    """Run the demo; returns 0 when no request failed and each answer matched the version
    that served it (and, with `bad_version`, the gate refused the bad one). With `lora`,
    run the LoRA demo instead (`hotweights.demo.lora_run`)."""
    if lora:
        from hotweights.demo.lora_run import run_lora_demo

        return run_lora_demo(duration, concurrency, policy, rebuild)
    import httpx
    import openai

    from hotweights.server.assembly import build_state, freeze_startup_heap
    from hotweights.testing import ServerThread

    v1, v2 = build_demo_versions(force=rebuild, progress=say)
    bad: Path | None = None
    gate_file: Path | None = None
    if bad_version:
        bad = build_bad_version(progress=say)
        gate_file = v1.parent / "gate.json"
        gate_file.write_text(json.dumps(DEMO_GATE, indent=2))
    config = Config.load(
        {
            "gate": str(gate_file) if gate_file is not None else None,
            "source": str(v1),
            "model_name": MODEL_NAME,
            "policy": policy,
            "model_roots": (str(Path(v1).parent),),
            "generation_workers": concurrency,
        }
    )
    state = build_state(config, observers=(LoadProgress(),))
    freeze_startup_heap(state)
    outcomes: list[Answered] = []
    with ServerThread(state) as server:
        server.wait_live()
        say(f"serving {v1} on {server.url}; {concurrency} clients for {duration:g} s")
        client = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=60
        )
        stop = threading.Event()
        per_worker: list[list[Answered]] = [[] for _ in range(concurrency)]
        workers = [
            threading.Thread(target=_traffic, args=(client, i, stop, per_worker[i]))
            for i in range(concurrency)
        ]
        begun = time.monotonic()
        for worker in workers:
            worker.start()
        gated = True
        if bad is not None:
            time.sleep(duration / 3)
            gated = _publish_bad(server.url, bad)
            time.sleep(max(0.0, begun + 2 * duration / 3 - time.monotonic()))
        else:
            time.sleep(duration / 2)
        say(f"publishing version two: POST /admin/reload {{path: {v2}}}")
        swap_started = time.monotonic()
        answer = httpx.post(
            f"{server.url}/admin/reload",
            json={"path": str(v2), "description": "demo: version two"},
            timeout=120,
        )
        swap_ended = time.monotonic()
        event = answer.json()
        time.sleep(max(0.0, begun + duration - time.monotonic()))
        stop.set()
        for worker in workers:
            worker.join()
        client.close()
        outcomes = [o for worker_outcomes in per_worker for o in worker_outcomes]
    code = _summarise(outcomes, answer.status_code, event, swap_started, swap_ended)
    return code if gated else 1


def _publish_bad(url: str, bad: Path) -> bool:
    """Ask the server to make the bad version live; print the gate's verdict. True when
    the gate refused it."""
    import httpx

    from hotweights.sources.quality_gate import verdict_table

    say(f"publishing a version that answers wrongly: POST /admin/reload {{path: {bad}}}")
    refused = httpx.post(
        f"{url}/admin/reload", json={"path": str(bad), "description": "demo: bad"}, timeout=120
    )
    event = httpx.get(f"{url}/admin/reloads", params={"limit": 1}).json()["events"][0]
    checks = tuple(GateCheck(**check) for check in event.get("gate", []))
    print()
    print(f"bad version: HTTP {refused.status_code}, outcome {event['outcome']}")
    print(verdict_table(GateVerdict(checks)))
    print()
    return refused.status_code == 422 and event["outcome"] == "gated"


def _summarise(
    outcomes: list[Answered],
    status: int,
    event: dict[str, Any],
    swap_started: float,
    swap_ended: float,
) -> int:
    failed = [o for o in outcomes if o.error is not None]
    mixed = [o for o in outcomes if o.error is None and o.generation is None]
    by_generation: dict[int, list[Answered]] = defaultdict(list)
    for o in outcomes:
        if o.error is None and o.generation is not None:
            by_generation[o.generation].append(o)
    wrong = [
        o
        for gen, served in by_generation.items()
        for o in served
        if o.question == DEMO_QUESTIONS[0] and o.answer != EXPECTED_ANSWERS.get(gen)
    ]
    print()
    print(
        f"requests: {len(outcomes)}   failed: {len(failed)}   "
        f"saw two versions: {len(mixed)}   wrong answer for their version: {len(wrong)}"
    )
    for gen in sorted(by_generation):
        served = by_generation[gen]
        samples = Counter(o.answer for o in served if o.question == DEMO_QUESTIONS[0])
        sample = samples.most_common(1)[0][0] if samples else served[0].answer
        streams = sum(o.stream for o in served)
        print(
            f"  generation {gen}: {len(served):4d} answers ({streams} streamed)  "
            f"e.g. {DEMO_QUESTIONS[0]!r} -> {sample!r}"
        )
    print()
    print("latency            p50        p99     n")
    windows = {
        "before swap": [o.latency for o in outcomes if o.ended < swap_started],
        "during swap": [
            o.latency for o in outcomes if o.started <= swap_ended and o.ended >= swap_started
        ],
        "after swap": [o.latency for o in outcomes if o.started > swap_ended],
    }
    for name, latencies in windows.items():
        print(f"  {name:12s} {_percentiles(latencies)}")
    print()
    phases = event.get("phases", {}) if status == 200 else {}
    phase_text = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in phases.items())
    print(
        f"swap: HTTP {status}, {(swap_ended - swap_started) * 1000:.0f} ms from trigger to live"
        f" ({phase_text}); generation {event.get('old_generation')} -> "
        f"{event.get('new_generation')}"
    )
    for o in failed[:5]:
        print(f"  failed: {o.error}")
    ok = status == 200 and not failed and not mixed and not wrong and len(by_generation) == 2
    print("result:", "OK - zero failed requests across the swap" if ok else "PROBLEMS (see above)")
    return 0 if ok else 1
