"""What the quality gate costs next to a load, and how fast a canary is caught.

Uses the demo's real tiny models (version one, version two, and the bad version), served
through `ServerThread` exactly as `hotweights serve` serves them.

1. Gate against load: the server runs with the demo's gate (`DEMO_GATE`: 2 golden prompts,
   perplexity ratio on a 1.2 k-character text, 5 timed runs of 32 tokens on each version);
   version two and version one are made live in turn (`--reloads` reloads), idle and then
   under a closed loop of `--clients` chat clients. Reported per reload: load, validate,
   warmup and gate seconds from the reload event, and the gate over the load. The same
   again with the reload benchmarks' model (25 M parameters, 97 MB, two random weight sets,
   `bench/peers/model.py`) and a gate of the same work that any answer passes (`BENCH_GATE`):
   the demo models are 0.1 M parameters, whose load costs next to nothing.
2. Canary detection: the server runs with `--canary 10% --bake 120s` (minimum 20 requests,
   error rate allowed +0.05); version two is made live, but every fifth request on it fails
   before its first byte (an injected fault: its tokenizer raises). Reported: seconds from
   the canary taking traffic to its rollback (the bake phase), the canary's requests and
   errors then, and requests failed as clients saw them (the retry on the stable version
   should make that 0). Repeated `--canaries` times.

    python bench/gate_canary.py [--reloads 4] [--clients 4] [--canaries 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
SHARE = "10%"
FAULT_EVERY = 5
BENCH_GATE: dict[str, Any] = {
    "prompts": [
        {"prompt": "The quick brown fox", "expect": {"regex": "(?s).*"}, "max_tokens": 16},
        {"messages": [{"role": "user", "content": "Hello"}], "expect": {"regex": "(?s).*"}},
    ],
    "eval_text": " ".join(["The quick brown fox jumps over the lazy dog."] * 27),
    "max_perplexity_ratio": 2.0,
    "max_latency_ratio": 3.0,
}
"""The work of `DEMO_GATE` (2 prompts, a 1.2 k-character text, 5 timed runs of 32 tokens
on each side), with checks random weights pass."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reloads", type=int, default=4, help="reloads per traffic case")
    parser.add_argument("--clients", type=int, default=4, help="concurrent chat clients")
    parser.add_argument("--canaries", type=int, default=3, help="faulty canaries to catch")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "gate_canary.json")
    args = parser.parse_args()

    from hotweights.demo.tinylm import save_tiny_model
    from hotweights.demo.versions import DEMO_GATE, build_bad_version, build_demo_versions
    from peers.model import bench_shape

    v1, v2 = build_demo_versions()
    build_bad_version()
    gate_file = v1.parent / "bench-gate.json"
    gate_file.write_text(json.dumps(DEMO_GATE))
    gate_rows = []
    for clients in (0, args.clients):
        gate_rows += _gate_case("demo", v1, v2, gate_file, clients, args.reloads)
    with tempfile.TemporaryDirectory(prefix="hotweights-gate-") as tmp:
        root = Path(tmp)
        b1, b2 = (save_tiny_model(root / n, seed=int(n), shape=bench_shape()) for n in "12")
        big_gate = root / "gate.json"
        big_gate.write_text(json.dumps(BENCH_GATE))
        for clients in (0, args.clients):
            gate_rows += _gate_case("97 MB", b1, b2, big_gate, clients, args.reloads)
    canary_rows = [_canary_case(v1, v2, args.clients) for _ in range(args.canaries)]
    result = {
        "machine": f"{platform.machine()}, {_cores()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gate": gate_rows,
        "canary": canary_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    report = _report(result)
    args.out.with_suffix(".md").write_text(report)
    print(report)
    return 0


def _gate_case(
    model: str, v1: Path, v2: Path, gate_file: Path, clients: int, reloads: int
) -> list[dict[str, Any]]:
    import httpx

    server = _server(v1, gate=str(gate_file))
    rows = []
    try:
        with _Traffic(server.url, clients) as traffic:
            for index in range(reloads):
                target = v2 if index % 2 == 0 else v1
                reply = httpx.post(
                    f"{server.url}/admin/reload", json={"path": str(target)}, timeout=600
                )
                event = reply.json()
                if reply.status_code != 200:
                    raise RuntimeError(f"reload {index} did not go live: {event}")
                phases = event["phases"]
                rows.append(
                    {
                        "model": model,
                        "clients": clients,
                        "target": target.name,
                        **{k: round(phases[k], 4) for k in ("load", "validate", "warmup", "gate")},
                        "gate_over_load": round(phases["gate"] / phases["load"], 2),
                        "checks_passed": all(c["passed"] is not False for c in event["gate"]),
                    }
                )
        rows[-1]["failed_requests"] = traffic.failed
        rows[-1]["requests"] = traffic.requests
    finally:
        server.stop()
        server.state.close(30)
    return rows


def _canary_case(v1: Path, v2: Path, clients: int) -> dict[str, Any]:
    import httpx

    loader = _faulty_loader(str(v2))
    server = _server(v1, canary=SHARE, bake="120s", canary_min_requests=20, loader=loader)
    try:
        with _Traffic(server.url, max(1, clients)) as traffic:
            started = time.monotonic()
            reply = httpx.post(f"{server.url}/admin/reload", json={"path": str(v2)}, timeout=600)
            trigger_to_end = time.monotonic() - started
            answered = reply.json()
        event = answered.get("event", answered)  # a rollback answers 422 with its event
        canary = event.get("canary") or {}
        return {
            "share": SHARE,
            "injected_error_rate": 1 / FAULT_EVERY,
            "outcome": event.get("outcome"),
            "detection_s": round(event["phases"]["bake"], 3),
            "trigger_to_rollback_s": round(trigger_to_end, 3),
            "canary_requests": canary.get("canary", {}).get("requests"),
            "canary_errors": canary.get("canary", {}).get("errors"),
            "stable_requests": canary.get("stable", {}).get("requests"),
            "reason": canary.get("reason"),
            "client_requests": traffic.requests,
            "client_failed": traffic.failed,
        }
    finally:
        server.stop()
        server.state.close(30)


def _faulty_loader(faulty: str) -> Any:
    """The server's own loader, but the version at `faulty` fails every fifth request
    before its first byte once warmed up (its `prompt_ids` raises)."""
    from hotweights.backends import LoadedLM, TransformersLoader
    from hotweights.engine.batching_loader import BatchingLoader, EngineSettings

    class FaultyLoader(BatchingLoader):
        def warmup(self, model: LoadedLM) -> None:
            super().warmup(model)
            if model.source != faulty:
                return
            honest = model.prompt_ids
            calls = itertools.count(1)

            def prompt_ids(prompt: str | Sequence[int]) -> list[int]:
                if next(calls) % FAULT_EVERY == 0:
                    raise RuntimeError("injected fault")
                return honest(prompt)

            model.prompt_ids = prompt_ids  # type: ignore[method-assign]

    return FaultyLoader(TransformersLoader(load_in="process"), EngineSettings())


def _server(v1: Path, loader: Any = None, **options: Any) -> Any:
    from hotweights.config import Config
    from hotweights.server.assembly import build_state, freeze_startup_heap
    from hotweights.testing import ServerThread

    config = Config.load(
        {
            "source": str(v1),
            "model_name": "m",
            "model_roots": (str(v1.parent),),
            **options,
        },
        environ={},
    )
    state = build_state(config, loader)
    freeze_startup_heap(state)
    server = ServerThread(state).start()
    server.wait_live()
    return server


class _Traffic:
    """`clients` threads asking the version question until stopped (none for 0)."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.requests = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def __enter__(self) -> _Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def _run(self) -> None:
        import httpx

        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "Which version are you?"}],
            "max_tokens": 32,
            "temperature": 0,
        }
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self._stop.is_set():
                response = client.post("/v1/chat/completions", json=body)
                with self._lock:
                    self.requests += 1
                    self.failed += response.status_code != 200


def _report(result: dict[str, Any]) -> str:
    lines = [
        f"# Gate and canary ({result['date']}, {result['machine']})",
        "",
        "Gate against load, per reload (demo: `DEMO_GATE` on the 0.1 M-parameter demo "
        "versions; 97 MB: `BENCH_GATE` on the reload benchmarks' 25 M-parameter model, two "
        "random weight sets; the gate's time includes measuring the live version):",
        "",
        "| model | clients | target | load s | validate s | warmup s | gate s | gate / load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["gate"]:
        lines.append(
            f"| {row['model']} | {row['clients']} | {row['target']} | {row['load']:.3f} "
            f"| {row['validate']:.3f} "
            f"| {row['warmup']:.3f} | {row['gate']:.3f} | {row['gate_over_load']:.1f}x |"
        )
    cases = sorted({(row["model"], row["clients"]) for row in result["gate"]})
    for model, clients in cases:
        rows = [r for r in result["gate"] if (r["model"], r["clients"]) == (model, clients)]
        gate = statistics.median(r["gate"] for r in rows)
        load = statistics.median(r["load"] for r in rows)
        failed, total = rows[-1].get("failed_requests", 0), rows[-1].get("requests", 0)
        lines.append(
            f"\n{model}, {clients} clients: median gate {gate:.3f} s against a median load of "
            f"{load:.3f} s; requests failed: {failed} of {total}."
        )
    header = (
        "| outcome | detection s | canary requests | canary errors | stable requests "
        "| client requests | client failed |"
    )
    lines += [
        "",
        f"Canary detection ({SHARE} of requests, 1 in {FAULT_EVERY} failing before its "
        "first byte):",
        "",
        header,
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["canary"]:
        lines.append(
            f"| {row['outcome']} | {row['detection_s']:.2f} | {row['canary_requests']} "
            f"| {row['canary_errors']} | {row['stable_requests']} | {row['client_requests']} "
            f"| {row['client_failed']} |"
        )
    return "\n".join(lines) + "\n"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
