"""A bounded soak: `hotweights serve --repo` under steady load while versions keep coming.

Serves a temporary model repository (loopback only) with the two demo versions (tiny Qwen3
models that answer "Which version are you?" with "I am version one." / "... two.").
Publishes them alternately with `hotweights.sources.publish` every `--reload-every`
seconds, so the watcher reloads, while a fixed rate of chat requests (streamed and not, an
open loop) runs for `--duration` seconds. Every second it samples the server process's RSS,
open file descriptors and threads. Stops by itself.

Reports failed requests, answers that do not match the weights of the generation that
served them, streams that saw two generations, reloads published and gone live (and the
time from the start of each publish to its version going live), and RSS/FDs/threads over
time: first, last, min, max and a least-squares slope per minute (over the whole run and
over its second half). Writes bench/results/soak.json and prints a markdown summary.

    python bench/soak.py [--duration 600] [--reload-every 30] [--rate 4] [--stream-share 0.5]
        [--watch auto] [--seed 0] [--json bench/results/soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from hotweights.demo.versions import DEMO_QUESTIONS, EXPECTED_ANSWERS, build_demo_versions
from hotweights.sources import publish
from hotweights.testing import free_port

MODEL = "soak"
WEIGHTS = (1, 2)
"""The demo versions: weight set 1 answers "one", weight set 2 "two"."""
_FINGERPRINT = re.compile(r"^hw-g(\d+)-")


@dataclass
class Outcome:
    """What one request saw."""

    started: float
    """Seconds since the load began."""
    stream: bool
    question: str
    latency: float = 0.0
    status: int | None = None
    generations: set[int] = field(default_factory=set)
    answer: str = ""
    error: str | None = None


@dataclass
class Reload:
    """One publish and what became of it."""

    at: float
    """Seconds since the load began."""
    version: int
    weights: int
    outcome: str | None = None
    generation: int | None = None
    publish_to_live_s: float | None = None


@dataclass
class Sample:
    t: float
    rss_mb: float
    fds: int
    threads: int
    helper_rss_mb: float
    """The server's child processes (the load process) together."""


def _generation(fingerprint: object) -> int | None:
    match = _FINGERPRINT.match(fingerprint if isinstance(fingerprint, str) else "")
    return int(match.group(1)) if match else None


async def ask(client: httpx.AsyncClient, outcome: Outcome, began: float) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": outcome.question}],
        "temperature": 0,
        "max_tokens": 48,
        "stream": outcome.stream,
    }
    try:
        if outcome.stream:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                outcome.status = response.status_code
                parts: list[str] = []
                done = False
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        done = True
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        outcome.error = f"error event: {chunk['error'].get('message')}"
                        continue
                    outcome.generations.add(_generation(chunk.get("system_fingerprint")) or 0)
                    if chunk.get("choices"):
                        parts.append(chunk["choices"][0]["delta"].get("content") or "")
                outcome.answer = "".join(parts)
                if response.status_code == 200 and not done and outcome.error is None:
                    outcome.error = "the stream ended without [DONE]"
        else:
            response = await client.post("/v1/chat/completions", json=body)
            outcome.status = response.status_code
            if response.status_code == 200:
                reply = response.json()
                outcome.generations.add(_generation(reply.get("system_fingerprint")) or 0)
                outcome.answer = reply["choices"][0]["message"]["content"] or ""
        if outcome.status != 200 and outcome.error is None:
            outcome.error = f"HTTP {outcome.status}"
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.latency = time.monotonic() - began - outcome.started


async def load(
    client: httpx.AsyncClient, args: argparse.Namespace, began: float, out: list[Outcome]
) -> int:
    """Start a request every 1/rate s (an open loop) until the duration ends; wait for
    those in flight. Returns how many starts were skipped because too many were in flight."""
    rng = random.Random(args.seed)
    tasks: set[asyncio.Task[None]] = set()
    skipped = 0
    turn = 0
    while (now := time.monotonic() - began) < args.duration:
        if len(tasks) < args.max_in_flight:
            # Mostly the version question (its answer names the weights), the others mixed in.
            question = (
                DEMO_QUESTIONS[turn % len(DEMO_QUESTIONS)] if turn % 4 == 3 else DEMO_QUESTIONS[0]
            )
            outcome = Outcome(now, rng.random() < args.stream_share, question)
            out.append(outcome)
            task = asyncio.create_task(ask(client, outcome, began))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        else:
            skipped += 1
        turn += 1
        await asyncio.sleep(max(0.0, turn / args.rate - (time.monotonic() - began)))
    if tasks:
        _, unfinished = await asyncio.wait(tasks, timeout=120)
        for task in unfinished:
            task.cancel()
        for outcome in out:
            if outcome.status is None and outcome.error is None:
                outcome.error = "no answer 120 s after the load ended"
    return skipped


async def reload_events(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await client.get(f"/admin/models/{MODEL}/reloads", params={"limit": 20})
    response.raise_for_status()
    events: list[dict[str, Any]] = response.json()["events"]
    return events


async def track(
    client: httpx.AsyncClient, reload: Reload, published_wall: float, limit: float
) -> None:
    """Poll the reload log until the event for `reload.version` ends (or `limit` s pass)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for event in await reload_events(client):
            if Path(str(event["target"])).name == str(reload.version) and event.get("outcome"):
                reload.outcome = str(event["outcome"])
                if event.get("new_generation") and reload.outcome in ("live", "rolled_back"):
                    reload.generation = int(event["new_generation"])
                    reload.publish_to_live_s = round(float(event["ended_at"]) - published_wall, 3)
                return
        await asyncio.sleep(0.2)


async def publisher(
    client: httpx.AsyncClient,
    args: argparse.Namespace,
    began: float,
    sources: dict[int, Path],
    repo: Path,
    out: list[Reload],
) -> None:
    """Publish weight sets 2, 1, 2, ... every `reload_every` s while the load runs."""
    k = 1
    while (due := k * args.reload_every) < args.duration:
        await asyncio.sleep(max(0.0, due - (time.monotonic() - began)))
        weights = WEIGHTS[k % 2]
        published_wall = time.time()
        published = await asyncio.to_thread(
            publish, sources[weights], repo, MODEL, description=f"soak publish {k}"
        )
        reload = Reload(round(time.monotonic() - began, 3), published.version, weights)
        out.append(reload)
        limit = min(args.reload_every, args.duration - due) - 1.0
        await track(client, reload, published_wall, max(limit, 5.0))
        k += 1


async def sampler(
    process: psutil.Process, began: float, stop: asyncio.Event, out: list[Sample]
) -> None:
    while True:
        try:
            with process.oneshot():
                out.append(
                    Sample(
                        round(time.monotonic() - began, 3),
                        round(process.memory_info().rss / 2**20, 2),
                        process.num_fds(),
                        process.num_threads(),
                        round(_children_rss(process) / 2**20, 2),
                    )
                )
        except psutil.Error:
            return
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
            return
        except TimeoutError:
            pass


def _children_rss(process: psutil.Process) -> int:
    total = 0
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # gone meanwhile
            continue
    return total


def trend(points: list[tuple[float, float]]) -> dict[str, float | None]:
    """first/last/min/max and the least-squares slope per minute, whole run and second half."""

    def slope(pts: list[tuple[float, float]]) -> float | None:
        if len(pts) < 3:
            return None
        mean_t = statistics.fmean(t for t, _ in pts)
        mean_v = statistics.fmean(v for _, v in pts)
        var = sum((t - mean_t) ** 2 for t, _ in pts)
        if var == 0:
            return None
        cov = sum((t - mean_t) * (v - mean_v) for t, v in pts)
        return round(cov / var * 60, 4)

    values = [v for _, v in points]
    half = points[len(points) // 2 :]
    return {
        "first": values[0] if values else None,
        "last": values[-1] if values else None,
        "min": min(values) if values else None,
        "max": max(values) if values else None,
        "slope_per_min": slope(points),
        "slope_per_min_second_half": slope(half),
    }


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 4)


def summarise(
    outcomes: list[Outcome],
    reloads: list[Reload],
    samples: list[Sample],
    generation_weights: dict[int, int],
) -> dict[str, Any]:
    failed = [o for o in outcomes if o.error is not None]
    mixed = [o for o in outcomes if o.error is None and len(o.generations) != 1]
    wrong = []
    checked = unattributed = 0
    for o in outcomes:
        if o.error is not None or len(o.generations) != 1 or o.question != DEMO_QUESTIONS[0]:
            continue
        weights = generation_weights.get(next(iter(o.generations)))
        if weights is None:
            unattributed += 1
            continue
        checked += 1
        if o.answer != EXPECTED_ANSWERS[weights]:
            wrong.append(o)
    reasons: dict[str, int] = {}
    for o in failed:
        reason = (o.error or "")[:80]
        reasons[reason] = reasons.get(reason, 0) + 1
    latencies = [o.latency for o in outcomes if o.error is None]
    live = [r for r in reloads if r.generation is not None]
    to_live = [r.publish_to_live_s for r in live if r.publish_to_live_s is not None]
    return {
        "requests": {
            "total": len(outcomes),
            "streamed": sum(o.stream for o in outcomes),
            "failed": len(failed),
            "failed_by_reason": reasons,
            "saw_two_generations": len(mixed),
            "answers_checked": checked,
            "wrong_answer_for_generation": len(wrong),
            "wrong_examples": [
                asdict(o) | {"generations": sorted(o.generations)} for o in wrong[:5]
            ],
            "unattributed": unattributed,
            "generations_seen": len({g for o in outcomes for g in o.generations}),
            "latency_p50_s": _percentile(latencies, 0.5),
            "latency_p95_s": _percentile(latencies, 0.95),
            "latency_p99_s": _percentile(latencies, 0.99),
            "latency_max_s": _percentile(latencies, 1.0),
        },
        "reloads": {
            "published": len(reloads),
            "live": len(live),
            "not_live": [asdict(r) for r in reloads if r.generation is None],
            "publish_to_live_median_s": round(statistics.median(to_live), 3) if to_live else None,
            "publish_to_live_max_s": max(to_live) if to_live else None,
        },
        "rss_mb": trend([(s.t, s.rss_mb) for s in samples]),
        "open_fds": trend([(s.t, float(s.fds)) for s in samples]),
        "threads": trend([(s.t, float(s.threads)) for s in samples]),
        "helper_rss_mb": trend([(s.t, s.helper_rss_mb) for s in samples]),
    }


def markdown(result: dict[str, Any]) -> str:
    req, rel = result["requests"], result["reloads"]
    lines = [
        f"soak: {result['duration_s']:g} s at {result['rate']:g} req/s, a publish every "
        f"{result['reload_every_s']:g} s ({result['date']})",
        "",
        "| requests | streamed | failed | saw two generations | wrong answer | answers checked "
        "| unattributed | starts skipped | p50 | p99 | max |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {req['total']} | {req['streamed']} | {req['failed']} | {req['saw_two_generations']} "
        f"| {req['wrong_answer_for_generation']} | {req['answers_checked']} "
        f"| {req['unattributed']} | {result['skipped_starts']} | {req['latency_p50_s']} s "
        f"| {req['latency_p99_s']} s | {req['latency_max_s']} s |",
        "",
        f"reloads: {rel['published']} published, {rel['live']} live; publish to live: median "
        f"{rel['publish_to_live_median_s']} s, max {rel['publish_to_live_max_s']} s",
        "",
        "| server process | first | last | min | max | slope /min | slope /min, 2nd half |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, name in (
        ("rss_mb", "RSS (MiB)"),
        ("open_fds", "open FDs"),
        ("threads", "threads"),
        ("helper_rss_mb", "load process RSS (MiB)"),
    ):
        t = result[key]
        lines.append(
            f"| {name} | {t['first']} | {t['last']} | {t['min']} | {t['max']} "
            f"| {t['slope_per_min']} | {t['slope_per_min_second_half']} |"
        )
    if req["failed_by_reason"]:
        lines += ["", "failures: " + json.dumps(req["failed_by_reason"])]
    lines += ["", f"server log: {result['server_log_tracebacks']} tracebacks"]
    return "\n".join(lines)


@dataclass
class Measured:
    outcomes: list[Outcome] = field(default_factory=list)
    reloads: list[Reload] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    generation_weights: dict[int, int] = field(default_factory=dict)
    """Generation -> the weight set it serves (1 or 2)."""
    skipped: int = 0


async def wait_ready(client: httpx.AsyncClient, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 180
    while server.poll() is None:
        try:
            if (await client.get("/ready")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not become ready within 180 s")
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the server exited with {server.returncode} (see its log)")


async def measure(
    args: argparse.Namespace,
    server: subprocess.Popen[bytes],
    url: str,
    sources: dict[int, Path],
    repo: Path,
    first_version: int,
) -> Measured:
    """The load, the publisher and the sampler, side by side for `args.duration` s."""
    measured = Measured()
    limits = httpx.Limits(max_connections=args.max_in_flight + 8)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        await wait_ready(client, server)
        for event in await reload_events(client):
            if Path(str(event["target"])).name == str(first_version) and event.get(
                "new_generation"
            ):
                measured.generation_weights[int(event["new_generation"])] = 1
        process = psutil.Process(server.pid)
        began = time.monotonic()
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler(process, began, stop, measured.samples))
        publishing = asyncio.create_task(
            publisher(client, args, began, sources, repo, measured.reloads)
        )
        measured.skipped = await load(client, args, began, measured.outcomes)
        await publishing
        stop.set()
        await sampling
    for reload in measured.reloads:
        if reload.generation is not None:
            measured.generation_weights[reload.generation] = reload.weights
    return measured


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    v1, v2 = build_demo_versions()
    repo = work / "repo"
    first = publish(v1, repo, MODEL, description="soak initial")
    port = free_port()
    log_path = work / "server.log"
    env = {**os.environ, "HOTWEIGHTS_LOG_LEVEL": "warning"}
    command = [
        sys.executable, "-m", "hotweights.cli", "serve", "--repo", str(repo),
        "--port", str(port), "--watch", args.watch,
    ]  # fmt: skip
    with log_path.open("w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        measured = asyncio.run(
            measure(args, server, f"http://127.0.0.1:{port}", {1: v1, 2: v2}, repo, first.version)
        )
    except BaseException:
        print(log_path.read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return {
        "benchmark": "soak",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "command": " ".join(["python", "bench/soak.py", *sys.argv[1:]]),
        "duration_s": args.duration,
        "rate": args.rate,
        "reload_every_s": args.reload_every,
        "stream_share": args.stream_share,
        "watch": args.watch,
        "skipped_starts": measured.skipped,
        **summarise(
            measured.outcomes, measured.reloads, measured.samples, measured.generation_weights
        ),
        "server_exit_code": server.returncode,
        "server_log_tracebacks": log_path.read_text().count("Traceback"),
        "reload_list": [asdict(r) for r in measured.reloads],
        "samples": [asdict(s) for s in measured.samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument(
        "--reload-every", type=float, default=30.0, help="seconds between publishes"
    )
    parser.add_argument("--rate", type=float, default=4.0, help="requests started per second")
    parser.add_argument(
        "--stream-share", type=float, default=0.5, help="share of streamed requests"
    )
    parser.add_argument("--max-in-flight", type=int, default=64, help="beyond this, skip a start")
    parser.add_argument("--watch", choices=("auto", "events", "poll"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench/results/soak.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hotweights-soak-") as tmp:
        result = soak(args, Path(tmp))
    print(markdown(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
