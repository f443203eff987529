"""An open-loop load generator (asyncio + httpx) and a resident-memory sampler.

Requests are scheduled at a fixed rate for a fixed duration, whatever the server does: a
slow server does not slow the sender down (a closed loop would hide latency spikes by
sending less). A cap on requests in flight bounds the client; a request due while the cap
is reached is not sent and is recorded as `dropped`. Every request is recorded, and the
load stops by itself at the end of the duration plus the per-request timeout.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import httpx
import psutil

from peers.procs import tree_usage
from peers.system import Clock, ModelVersion, ReloadResult, System, Workload

Outcome = Literal["ok", "http_error", "timeout", "error", "dropped"]


@dataclass
class Record:
    """One request: when it was due, started and ended (seconds since the run's start), how
    it ended, and which version answered it."""

    seq: int
    scheduled: float
    start: float
    end: float
    outcome: Outcome
    status: int | None = None
    label: str | None = None
    """The version as the system named it (hotweights: `g3`; peers: the version number)."""
    text: str | None = None
    error: str | None = None
    version: int | None = None
    """The benchmark's version number, resolved from `label` after the run."""
    weights: str | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def failed(self) -> bool:
        return self.outcome != "ok"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("scheduled", "start", "end"):
            data[key] = round(data[key], 4)
        data["latency_ms"] = round(self.latency * 1000, 2)
        return data


@dataclass(frozen=True)
class LoadSpec:
    rate: float
    """Requests per second, evenly spaced."""
    duration: float
    """Seconds of sending."""
    max_in_flight: int
    timeout: float
    """Seconds one request may take before it counts as timed out."""


class MonotonicClock:
    """Seconds since construction."""

    def __init__(self) -> None:
        self.origin = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.origin


async def run_load(
    system: System,
    workload: Workload,
    spec: LoadSpec,
    clock: Clock,
    reloads: list[tuple[float, ModelVersion]],
) -> tuple[list[Record], list[ReloadResult]]:
    """Send `spec`'s load at `system` and trigger `reloads` ((second, version), in order,
    each after the one before went live) meanwhile; return every request and reload."""
    request = system.request(workload)
    records: list[Record] = []
    results: list[ReloadResult] = []
    in_flight: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(
        max_connections=spec.max_in_flight, max_keepalive_connections=spec.max_in_flight
    )
    async with httpx.AsyncClient(base_url=system.base_url, limits=limits) as client:

        async def one(seq: int, scheduled: float) -> None:
            start = clock()
            record = Record(seq, scheduled, start, start, "error")
            try:
                response = await client.post(request.path, json=request.body, timeout=spec.timeout)
                record.end = clock()
                record.status = response.status_code
                if response.is_success:
                    record.label, record.text = system.answer_label(
                        dict(response.headers), response.json()
                    )
                    record.outcome = "ok"
                else:
                    record.outcome = "http_error"
                    record.error = response.text[:300]
            except httpx.TimeoutException as exc:
                record.end = clock()
                record.outcome = "timeout"
                record.error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # any failure is a measured outcome, not a crash
                record.end = clock()
                record.error = f"{type(exc).__name__}: {exc}"[:300]
            records.append(record)

        async def trigger_reloads() -> None:
            for at, version in reloads:
                await asyncio.sleep(max(0.0, at - clock()))
                results.append(await asyncio.to_thread(system.reload, version, clock))

        reloader = asyncio.create_task(trigger_reloads())
        begin = clock()
        total = int(spec.duration * spec.rate)
        for seq in range(total):
            due = begin + seq / spec.rate
            await asyncio.sleep(max(0.0, due - clock()))
            if len(in_flight) >= spec.max_in_flight:
                now = clock()
                records.append(Record(seq, due, now, now, "dropped", error="in-flight cap"))
                continue
            task = asyncio.create_task(one(seq, due))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(set(in_flight), timeout=spec.timeout + 5)
        await reloader
    records.sort(key=lambda r: r.seq)
    return records, results


class RssSampler:
    """Samples the resident memory of a process tree every `interval` seconds in a thread,
    and accounts for the machine's CPU meanwhile: the tree's, the benchmark's own and the
    rest (other processes on a shared machine make latency noisy; the report says how
    much they took).

    Use as a context manager; `samples` holds (seconds since the run's start, bytes)."""

    def __init__(self, pid: int, clock: Clock, interval: float = 0.05) -> None:
        self.pid = pid
        self.clock = clock
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.cpu: dict[str, float] = {}
        self._tree_cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._began = (time.monotonic(), psutil.cpu_times(), psutil.Process().cpu_times())
        self._tree_start = dict(tree_usage(self.pid)[1])
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        began, machine0, own0 = self._began
        wall = time.monotonic() - began
        machine1, own1 = psutil.cpu_times(), psutil.Process().cpu_times()
        busy = (sum(machine1) - machine1.idle - getattr(machine1, "iowait", 0.0)) - (
            sum(machine0) - machine0.idle - getattr(machine0, "iowait", 0.0)
        )
        tree = sum(
            seconds - self._tree_start.get(pid, 0.0) for pid, seconds in self._tree_cpu.items()
        )
        own = (own1.user + own1.system) - (own0.user + own0.system)
        seconds = wall or 1.0
        self.cpu = {
            "machine_cores_busy": round(busy / seconds, 2),
            "server_cores": round(tree / seconds, 2),
            "benchmark_cores": round(own / seconds, 2),
            "other_processes_cores": round(max(0.0, busy - tree - own) / seconds, 2),
        }

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, cpu = tree_usage(self.pid)
            self._tree_cpu.update(cpu)
            if rss:
                self.samples.append((self.clock(), rss))
            self._stop.wait(self.interval)
