"""Reload under load: hotweights next to TorchServe, Seldon MLServer and Ray Serve.

One run, one machine, one model (a Qwen3-style model built on the spot in two weight sets:
97 MB, or 1.3 GB with `--size 1.3GB`), one load: a fixed request rate of greedy
completions for a fixed time, while K new versions go live, alternating between the two
weight sets so every answer can be traced to the version that gave it. Each peer is
installed into its own cached virtual environment and reloaded through its own mechanism.

Rows: hotweights with each swap policy, and `availability/batch1`, a control row that
generates for one request at a time as every peer does (`--policies`, see
peers/hotweights_server.py); TorchServe (the old version unregistered once drained);
MLServer; Ray Serve twice, `ray-serve/reconfigure` (one replica, reloaded in place) and
`ray-serve/rolling` (two replicas, a rolling update to a new deployment version).
`--peers ray` picks both Ray rows, `ray-reconfigure` or `ray-rolling` one of them.

Writes bench/results/reload_under_load.{json,md,png} at the default size, and
reload_under_load-SIZE.{json,md,png} at another; see bench/README.md for what each figure
means.

    python bench/reload_under_load.py [--size 97MB|1.3GB] [--duration S] [--rate R]
        [--reloads 5] [--policies availability,resource,availability/batch1]
        [--peers torchserve,mlserver,ray] [--hotweights-trigger publish|admin]
        [--soak-reloads 50] [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from peers.hotweights_server import (
    HOTWEIGHTS_ROWS,
    TRIGGERS,
    AdminTrigger,
    HotweightsRow,
    HotweightsSystem,
    PublishTrigger,
    ReloadTrigger,
)
from peers.lineup import PEER_GROUPS, PEER_SYSTEMS, PEERS, hotweights_rows, make_peer, peer_rows
from peers.loadgen import LoadSpec, MonotonicClock, Record, RssSampler, run_load
from peers.model import DEFAULT_SIZE, SIZES, BenchSize
from peers.plot import plot
from peers.procs import wait_quiet
from peers.report import (
    figures,
    markdown,
    soak_figures,
    targets,
    targets_markdown,
    window_end,
)
from peers.system import ModelVersion, PeerUnavailable, ReloadResult, System, Workload

BENCH = Path(__file__).resolve().parent
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
SEEDS = {"A": 1, "B": 2}


def main() -> int:
    args = _parser().parse_args()
    if args.torch_threads:
        # Inherited by every server and worker the benchmark starts, and by the bare load.
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
        os.environ["BENCH_TORCH_THREADS"] = str(args.torch_threads)
    started = time.monotonic()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hotweights-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, workdir, started)
    finally:
        if not args.keep_workdir and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size",
        choices=SIZES,
        default=DEFAULT_SIZE,
        help="the model's size (its shape in peers/model.py)",
    )
    parser.add_argument(
        "--duration", type=float, help="seconds of load per system (default: the size's)"
    )
    parser.add_argument("--rate", type=float, help="requests per second (default: the size's)")
    parser.add_argument("--reloads", type=int, default=5, help="versions made live under load")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per answer")
    parser.add_argument("--max-in-flight", type=int, default=32, help="client cap")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument(
        "--tail", type=float, default=1.0, help="seconds a reload window extends past live"
    )
    parser.add_argument("--soak-reloads", type=int, default=50, help="reloads without load")
    parser.add_argument(
        "--hotweights-trigger",
        choices=TRIGGERS,
        default="publish",
        help="publish into a served repository, or POST /admin/reload with a path",
    )
    parser.add_argument(
        "--policies",
        default=",".join(HOTWEIGHTS_ROWS),
        help=f"hotweights rows ('' for none), of {', '.join(HOTWEIGHTS_ROWS)}",
    )
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help=f"peers to run ('' for none), of {', '.join([*PEER_GROUPS, *PEER_SYSTEMS])}",
    )
    parser.add_argument(
        "--peer-cache",
        type=Path,
        default=Path(os.environ.get("HOTWEIGHTS_BENCH_PEERS", "~/.cache/hotweights/bench-peers")),
        help="where each peer's virtual environment is installed once and reused",
    )
    parser.add_argument("--install-timeout", type=float, default=1800.0)
    parser.add_argument("--start-timeout", type=float, default=240.0)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads of every server process (0: torch's default, one per core)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="seconds to wait for other processes to leave the CPUs before each system",
    )
    parser.add_argument("--bare-runs", type=int, default=3, help="fresh processes timed")
    parser.add_argument("--workdir", help="keep models and server logs here")
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    return parser


def _run(args: argparse.Namespace, workdir: Path, started: float) -> int:
    size: BenchSize = SIZES[args.size]
    args.rate = size.rate if args.rate is None else args.rate
    args.duration = size.duration if args.duration is None else args.duration
    rows = hotweights_rows(args.policies)
    peers = peer_rows(args.peers)
    model = _build_models(workdir / "models" / args.size, size) | {"size": args.size}
    dirs = {w: workdir / "models" / args.size / str(seed) for w, seed in SEEDS.items()}
    versions = [_version(n, dirs) for n in range(1, args.reloads + 2)]
    wait_quiet(args.quiet_wait)
    bare = _bare_load(dirs["A"], args.bare_runs)
    _say(f"bare load+validate+warmup of one version in a fresh process: {bare}")
    workload = Workload(PROMPT, args.max_tokens)
    spec = LoadSpec(args.rate, args.duration, args.max_in_flight, args.timeout)
    logs = workdir / "logs"
    systems: list[System] = [
        HotweightsSystem(
            row.policy,
            _trigger(args.hotweights_trigger, row, workdir),
            logs,
            max_batch_size=row.max_batch_size,
        )
        for row in rows
    ]
    systems += [
        make_peer(
            name,
            cache=args.peer_cache.expanduser(),
            workdir=workdir,
            install_timeout=args.install_timeout,
            start_timeout=args.start_timeout,
        )
        for name in peers
    ]
    results = []
    for system in systems:
        _say(f"{system.name}: installing, starting, {args.duration:g} s of load")
        results.append(_run_system(system, versions, dirs, workload, spec, args, bare))
        _say(f"{system.name}: {_summary(results[-1])}")
    return _write(args, results, model, bare, started)


def _trigger(kind: str, row: HotweightsRow, workdir: Path) -> ReloadTrigger:
    if kind == "admin":
        return AdminTrigger(workdir / "models")
    slug = row.name.replace("/", "-")  # each row publishes into a repository of its own
    return PublishTrigger(workdir / f"repo-{slug}", workdir / "logs" / f"publish-{slug}.log")


def _version(number: int, dirs: dict[str, Path]) -> ModelVersion:
    weights = "A" if number % 2 else "B"
    return ModelVersion(number, dirs[weights], weights)


def _build_models(root: Path, size: BenchSize) -> dict[str, Any]:
    from hotweights.demo.tinylm import save_tiny_model

    for seed in SEEDS.values():
        path = root / str(seed)
        if not (path / "model.safetensors").exists():
            save_tiny_model(path, seed=seed, shape=size.shape)
    weight_bytes = (root / str(SEEDS["A"]) / "model.safetensors").stat().st_size
    return {
        "kind": "Qwen3ForCausalLM, random weights, float32, safetensors",
        "shape": vars(size.shape),
        "parameters_m": round(weight_bytes / 4 / 1e6, 1),
        "weights_mb": round(weight_bytes / 1024 / 1024, 1),
    }


def _bare_load(path: Path, runs: int) -> dict[str, float]:
    """Median of `runs` fresh processes timing load+validate+warmup (see peers/bare_load.py)."""
    timings: list[dict[str, float]] = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, BENCH / "peers" / "bare_load.py", path],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        timings.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: round(statistics.median(t[key] for t in timings), 4) for key in timings[0]}


def _warm(system: System, workload: Workload, count: int = 3) -> None:
    """A few sequential requests before the clock starts; each must succeed."""
    request = system.request(workload)
    with httpx.Client(base_url=system.base_url, timeout=60) as client:
        for _ in range(count):
            response = client.post(request.path, json=request.body)
            if not response.is_success:
                raise PeerUnavailable(
                    "start", f"warm-up request: {response.status_code} {response.text[:300]}"
                )
            system.answer_label(dict(response.headers), response.json())


def _run_system(
    system: System,
    versions: list[ModelVersion],
    dirs: dict[str, Path],
    workload: Workload,
    spec: LoadSpec,
    args: argparse.Namespace,
    bare: dict[str, float],
) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": system.name, "status": "ok"}
    stage = "install"
    try:
        began = time.monotonic()
        system.install()
        entry["install_s"] = round(time.monotonic() - began, 1)
        stage = "start"
        began = time.monotonic()
        system.start(versions[0])
        _warm(system, workload)
        entry["start_s"] = round(time.monotonic() - began, 1)
        if isinstance(system, HotweightsSystem):
            entry["serving"] = system.serving
        stage = "run"
        entry["quiet_gate"] = wait_quiet(args.quiet_wait)
        clock = MonotonicClock()
        gap = spec.duration / len(versions)
        schedule = [(gap * index, version) for index, version in enumerate(versions) if index]
        with RssSampler(system.server_pid(), clock) as sampler:
            records, reloads = asyncio.run(run_load(system, workload, spec, clock, schedule))
        _resolve(system, records, versions)
        entry["figures"] = figures(records, reloads, sampler.samples, tail=args.tail, bare=bare)
        entry["reloads"] = [_reload_dict(r, args.tail) for r in reloads]
        entry["cpu"] = sampler.cpu
        entry["records"] = [r.to_dict() for r in records]
        entry["rss"] = [(round(t, 3), round(b / 1024 / 1024, 1)) for t, b in sampler.samples]
        if isinstance(system, HotweightsSystem) and not system.row.control and args.soak_reloads:
            entry["soak"] = _soak(system, args.soak_reloads, len(versions), dirs, bare)
    except PeerUnavailable as exc:
        entry |= {"status": "failed", "stage": exc.stage, "reason": exc.reason}
    except Exception as exc:  # a broken driver is reported like a broken peer
        entry |= {"status": "failed", "stage": stage, "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        system.stop()
    return entry


def _resolve(system: System, records: list[Record], versions: list[ModelVersion]) -> None:
    weights = {v.number: v.weights for v in versions}
    for record in records:
        if record.label is not None:
            record.version = system.version_of(record.label)
            record.weights = weights.get(record.version) if record.version else None


def _reload_dict(result: ReloadResult, tail: float) -> dict[str, Any]:
    return {
        "version": result.version,
        "weights": result.weights,
        "trigger": round(result.trigger, 4),
        "live": round(result.live, 4),
        "done": None if result.done is None else round(result.done, 4),
        "window_end": round(window_end(result, tail), 4),
        "seconds": round(result.seconds, 4),
        "ok": result.ok,
        "detail": result.detail,
        "server": result.server,
    }


def _soak(
    system: HotweightsSystem, count: int, first: int, dirs: dict[str, Path], bare: dict[str, float]
) -> dict[str, Any]:
    """`count` reloads back to back without load; RSS read after each, once the old
    version is unloaded."""
    clock = MonotonicClock()
    rss_after: list[int] = []
    seconds: list[float] = []
    server_seconds: list[float] = []
    failures: list[str] = []
    for number in range(first + 1, first + 1 + count):
        result = system.reload(_version(number, dirs), clock)
        if not result.ok:
            failures.append(result.detail)
            continue
        seconds.append(result.seconds)
        if "duration_s" in result.server:
            server_seconds.append(float(result.server["duration_s"]))
        if not system.settled():
            failures.append(f"version {number}: the old version was still resident after 60 s")
        rss_after.append(system.rss())
        if isinstance(system.trigger, PublishTrigger):
            system.trigger.prune(keep_from=number - 1)
    return {**soak_figures(rss_after, seconds, server_seconds, bare), "failures": failures}


def _summary(entry: dict[str, Any]) -> str:
    if entry["status"] != "ok":
        return f"FAILED at {entry['stage']}: {entry['reason'][:400]}"
    f = entry["figures"]
    return (
        f"{f['failed']} failed of {f['requests']}, p99 {f['steady_p99_ms']} -> "
        f"{f['reload_p99_ms']} ms (x{f['p99_ratio']}), reload {f['reload_s_median']} s, "
        f"peak RSS x{f['rss_peak_ratio']}; cores used by other processes "
        f"{entry['cpu']['other_processes_cores']}"
    )


def _machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _write(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    model: dict[str, Any],
    bare: dict[str, float],
    started: float,
) -> int:
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    command = " ".join(["python bench/reload_under_load.py", *sys.argv[1:]])
    rows = targets(results)
    wall = round(time.monotonic() - started, 1)
    settings = {
        k: v
        for k, v in vars(args).items()
        if k not in ("workdir", "keep_workdir", "out", "peer_cache")
    } | {"prompt": PROMPT, "tail_s": args.tail}
    document = {
        "benchmark": "reload_under_load",
        "date": date,
        "wall_s": wall,
        "command": command,
        "machine": _machine(),
        "settings": settings,
        "model": model,
        "bare_load": bare,
        "targets": rows,
        "systems": results,
    }
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # The default size keeps the historical names; another size never overwrites them.
    stem = "reload_under_load" + ("" if args.size == DEFAULT_SIZE else f"-{args.size}")
    (out / f"{stem}.json").write_text(json.dumps(document, indent=1, default=str))
    table = markdown(results)
    text = (
        f"Reload under load, {date}; `{command}`; wall {wall} s\n\n"
        f"{args.rate:g} req/s for {args.duration:g} s per system, {args.reloads} reloads, "
        f"{args.max_tokens} greedy tokens per request; model {model['parameters_m']} M "
        f"parameters ({model['weights_mb']} MB); bare load+validate+warmup "
        f"{bare.get('total_s')} s cold, {bare.get('repeat_total_s')} s warm\n\n{table}\n\n"
        f"{targets_markdown(rows)}\n"
    )
    (out / f"{stem}.md").write_text(text)
    png = plot(results, out / f"{stem}.png", f"reload under load ({args.size}), {date}")
    print(text)
    print(f"wrote {out / f'{stem}.json'}, {out / f'{stem}.md'}", end="")
    print(f", {png}" if png else " (no plot: matplotlib is not installed)")
    return 0


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
