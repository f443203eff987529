"""Reloads at real model sizes: what a reload costs against a bare load, idle and under load.

For each size (models of about 0.1, 1.3 and 4.3 GB of float32 weights, built on the spot
in two weight sets; the big ones wide with few layers so that generating stays cheap on
two cores) and each swap policy:

- **baseline**: a bare warm load with plain transformers in one process (`peers/
  bare_warm.py`: `from_pretrained`, the validate-equivalent forward pass, one more
  forward), median of 3 after one untimed round;
- **idle**: `hotweights serve` in a subprocess, `--reloads` reloads through
  `POST /admin/reload` with nothing else running: trigger to live and each phase;
- **capacity**: a closed loop of `--capacity-clients` clients for `--capacity-seconds`
  (completed requests per second);
- **under load**: an open loop at `--load-share` of that capacity while `--reloads` more
  versions go live: p50/p99 steady and in reload windows, peak RSS in the windows over the
  steady median, failed requests, and every reload's phases.

Then the issue's targets, each met or missed. Writes bench/results/reload_sizes.{json,md,png}.
Every server and bare load runs with one torch thread (`--torch-threads`); `--device cuda`
runs both on a GPU (the machine this was written on has none).

    python bench/reload_sizes.py [--sizes 0.1GB,1.3GB,4.3GB] [--policies availability,resource]
        [--workdir DIR]  # keeps the models (two weight sets each, 11 GB in all)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from hotweights.demo.tinylm import TinyShape
from peers.hotweights_server import AdminTrigger, HotweightsSystem
from peers.loadgen import LoadSpec, MonotonicClock, RssSampler, run_load
from peers.model import SIZES, bench_shape
from peers.procs import wait_quiet
from peers.report import figures
from peers.system import ModelVersion, ReloadResult, Workload

BENCH = Path(__file__).resolve().parent
PROMPT = "Once upon a time"
"""Short (16 byte-level tokens): at 4.3 GB a prompt's prefill costs about 2 GFLOP a token."""
POLICIES = ("availability", "resource")
SEEDS = {"A": 1, "B": 2}
SHAPES: dict[str, TinyShape] = {
    "0.1GB": bench_shape(8),  # 25 M parameters
    "1.3GB": SIZES["1.3GB"].shape,  # 330 M: hidden 2048, 7 layers
    "4.3GB": TinyShape(4096, 11008, 6, 32, 8, 1024),  # 1.06 B: hidden 4096, 6 layers
}
TARGETS = {
    "load_vs_bare_load": 1.5,
    "live_vs_baseline": 1.3,
    "p99_ratio": 1.5,
    "rss_peak_ratio": {"availability": 2.1, "resource": 1.1},
}


def main() -> int:
    args = _parser().parse_args()
    if args.torch_threads:
        # Inherited by the server and the bare load alike.
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
    sizes = [s for s in args.sizes.split(",") if s]
    for size in sizes:
        if size not in SHAPES:
            raise SystemExit(f"unknown size {size!r}; choose from {', '.join(SHAPES)}")
    policies = [p for p in args.policies.split(",") if p]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hotweights-sizes-"))
    started = time.monotonic()
    try:
        rows = [_size(size, policies, args, workdir) for size in sizes]
        return _write(args, rows, started)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SHAPES))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--reloads", type=int, default=3, help="reloads idle, and under load")
    parser.add_argument("--max-tokens", type=int, default=8, help="greedy tokens per request")
    parser.add_argument("--capacity-clients", type=int, default=8)
    parser.add_argument("--capacity-seconds", type=float, default=20.0)
    parser.add_argument("--load-share", type=float, default=0.5, help="of the capacity")
    parser.add_argument(
        "--min-gap", type=float, default=10.0, help="least seconds between reloads under load"
    )
    parser.add_argument("--tail", type=float, default=1.0, help="a window's seconds past live")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--bare-runs", type=int, default=3)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads of the server and the bare load (0: torch's default); on two "
        "cores, two threads beside the server's own and the client's make latency erratic",
    )
    parser.add_argument("--quiet-wait", type=float, default=60.0)
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N, for the server and the bare load"
    )
    parser.add_argument("--workdir", help="keep (and reuse) the models here")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    return parser


def _size(
    size: str, policies: list[str], args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    root = workdir / size
    dirs = {
        weights: _build(root / str(seed), SHAPES[size], seed) for weights, seed in SEEDS.items()
    }
    weight_bytes = (dirs["A"] / "model.safetensors").stat().st_size
    _say(f"{size}: {weight_bytes / 1e9:.2f} GB of weights; bare warm load")
    wait_quiet(args.quiet_wait)
    bare = _bare(dirs["A"], args.bare_runs, args.device)
    _say(f"{size}: bare {bare}")
    runs = {policy: _policy(policy, dirs, root, args) for policy in policies}
    return {
        "size": size,
        "shape": vars(SHAPES[size]),
        "weights_gb": round(weight_bytes / 1e9, 3),
        "parameters_m": round(weight_bytes / 4 / 1e6, 1),
        "bare": bare,
        "policies": runs,
    }


def _build(path: Path, shape: TinyShape, seed: int) -> Path:
    from hotweights.demo.tinylm import save_tiny_model

    if not (path / "model.safetensors").exists():
        save_tiny_model(path, seed=seed, shape=shape)
    return path


def _bare(path: Path, runs: int, device: str) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            BENCH / "peers" / "bare_warm.py",
            path,
            "--runs",
            str(runs),
            "--device",
            device,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


class _Versions:
    """Version numbers that keep rising across a server's life, alternating weight sets."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs
        self.number = 0

    def next(self) -> ModelVersion:
        self.number += 1
        weights = "A" if self.number % 2 else "B"
        return ModelVersion(self.number, self.dirs[weights], weights)


def _policy(
    policy: str, dirs: dict[str, Path], root: Path, args: argparse.Namespace
) -> dict[str, Any]:
    versions = _Versions(dirs)
    device = None if args.device == "cpu" else args.device
    system = HotweightsSystem(policy, AdminTrigger(root), root / "logs", device=device)
    workload = Workload(PROMPT, args.max_tokens)
    entry: dict[str, Any] = {}
    try:
        system.start(versions.next())
        _check_answers(system, workload)
        wait_quiet(args.quiet_wait)
        entry["idle"] = _idle(system, versions, args.reloads)
        _say(f"{system.name}: idle {entry['idle']['live_s_median']} s trigger to live")
        capacity = asyncio.run(_capacity(system, workload, args))
        entry["capacity"] = capacity
        rate = round(capacity["req_per_s"] * args.load_share, 3)
        gap = max(args.min_gap, 3 * entry["idle"]["live_s_median"] + 4)
        spec = LoadSpec(rate, gap * (args.reloads + 1), 256, args.timeout)
        entry["load"] = _under_load(system, versions, workload, spec, gap, args)
        f = entry["load"]["figures"]
        _say(
            f"{system.name}: {rate} req/s: {f['failed']} failed of {f['requests']}, p99 "
            f"{f['steady_p99_ms']} -> {f['reload_p99_ms']} ms, live "
            f"{entry['load']['live_s_median']} s, peak RSS x{f['rss_peak_ratio']}"
        )
    finally:
        system.stop()
    return entry


def _check_answers(system: HotweightsSystem, workload: Workload, count: int = 3) -> None:
    request = system.request(workload)
    with httpx.Client(base_url=system.base_url, timeout=300) as client:
        for _ in range(count):
            response = client.post(request.path, json=request.body)
            response.raise_for_status()


def _idle(system: HotweightsSystem, versions: _Versions, count: int) -> dict[str, Any]:
    clock = MonotonicClock()
    results: list[ReloadResult] = []
    with RssSampler(system.server_pid(), clock) as sampler:
        steady = system.rss()
        for _ in range(count):
            results.append(system.reload(versions.next(), clock))
            if not system.settled(timeout=300):
                raise RuntimeError(f"{system.name}: the old version stayed resident")
    return {
        **_reloads(results),
        "rss_steady_mb": round(steady / 2**20, 1),
        "rss_peak_mb": round(max(b for _, b in sampler.samples) / 2**20, 1),
    }


def _reloads(results: list[ReloadResult]) -> dict[str, Any]:
    failed = [r.detail for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"reloads failed: {failed}")
    phases = sorted({p for r in results for p in r.server.get("phases", {})})
    return {
        "live_s": [round(r.seconds, 3) for r in results],
        "live_s_median": round(statistics.median(r.seconds for r in results), 3),
        "phases_s_median": {
            p: round(statistics.median(r.server["phases"].get(p, 0.0) for r in results), 3)
            for p in phases
        },
        "phases_s": [{p: round(s, 3) for p, s in r.server["phases"].items()} for r in results],
    }


async def _capacity(
    system: HotweightsSystem, workload: Workload, args: argparse.Namespace
) -> dict[str, Any]:
    """Completed requests per second with `capacity_clients` clients sending back to back."""
    request = system.request(workload)
    done: list[float] = []
    began = time.monotonic()
    deadline = began + args.capacity_seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            response = await client.post(request.path, json=request.body, timeout=args.timeout)
            response.raise_for_status()
            done.append(time.monotonic() - began)

    async with httpx.AsyncClient(base_url=system.base_url) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(args.capacity_clients)))
    elapsed = max(done) if done else args.capacity_seconds
    return {
        "clients": args.capacity_clients,
        "completed": len(done),
        "seconds": round(elapsed, 2),
        "req_per_s": round(len(done) / elapsed, 3),
    }


def _under_load(
    system: HotweightsSystem,
    versions: _Versions,
    workload: Workload,
    spec: LoadSpec,
    gap: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    wait_quiet(args.quiet_wait)
    clock = MonotonicClock()
    schedule = [(gap * (i + 1), versions.next()) for i in range(args.reloads)]
    with RssSampler(system.server_pid(), clock) as sampler:
        records, reloads = asyncio.run(run_load(system, workload, spec, clock, schedule))
    for record in records:
        if record.label is not None:
            record.version = system.version_of(record.label)
    return {
        "rate": spec.rate,
        "duration_s": spec.duration,
        "gap_s": round(gap, 1),
        "figures": figures(records, reloads, sampler.samples, tail=args.tail, bare={}),
        "cpu": sampler.cpu,
        "failures": [r.to_dict() for r in records if r.failed],
        **_reloads(reloads),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target of the issue, per size and policy: the figure, the limit, met or not."""
    out: list[dict[str, Any]] = []
    for row in rows:
        bare = row["bare"]
        for policy, run in row["policies"].items():
            idle, load = run["idle"], run["load"]
            f = load["figures"]
            rss_limit = TARGETS["rss_peak_ratio"][policy]  # type: ignore[index]
            checks = [
                (
                    "load phase / bare warm load (idle)",
                    _ratio(idle["phases_s_median"].get("load"), bare["load_s"]),
                    TARGETS["load_vs_bare_load"],
                ),
                (
                    "trigger to live / bare load+validate+forward (idle)",
                    _ratio(idle["live_s_median"], bare["total_s"]),
                    TARGETS["live_vs_baseline"],
                ),
                ("p99 in reload windows / steady", f["p99_ratio"], TARGETS["p99_ratio"]),
                ("peak RSS in reload windows / steady", f["rss_peak_ratio"], rss_limit),
                ("failed requests", f["failed"], 0),
            ]
            for name, value, limit in checks:
                met = None if value is None else value <= limit
                out.append(
                    {
                        "size": row["size"],
                        "policy": policy,
                        "target": name,
                        "value": value,
                        "limit": limit,
                        "met": met,
                    }
                )
    return out


def _markdown(rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> str:
    lines = [
        "| size | policy | bare load / +validate+forward s | idle: live s (load / validate "
        "/ warmup) | capacity req/s | load req/s | p50 steady -> reload ms | p99 steady -> "
        "reload ms (x) | under load: live s (load) | RSS steady -> peak MB (x) | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        bare = row["bare"]
        for policy, run in row["policies"].items():
            idle, load = run["idle"], run["load"]
            f, ph, lph = load["figures"], idle["phases_s_median"], load["phases_s_median"]
            lines.append(
                f"| {row['size']} ({row['weights_gb']} GB) | {policy} | "
                f"{bare['load_s']} / {bare['total_s']} | "
                f"{idle['live_s_median']} ({ph.get('load')} / {ph.get('validate')} / "
                f"{ph.get('warmup')}) | {run['capacity']['req_per_s']} | {load['rate']} | "
                f"{f['steady_p50_ms']} -> {f['reload_p50_ms']} | {f['steady_p99_ms']} -> "
                f"{f['reload_p99_ms']} (x{f['p99_ratio']}) | {load['live_s_median']} "
                f"({lph.get('load')}) | {f['rss_steady_mb']} -> {f['rss_peak_reload_mb']} "
                f"(x{f['rss_peak_ratio']}) | {f['failed']} of {f['requests']} |"
            )
    lines += ["", "| size | policy | target | value | limit | met |", "|---|---|---|---|---|---|"]
    for c in checks:
        met = "?" if c["met"] is None else ("met" if c["met"] else "**missed**")
        lines.append(
            f"| {c['size']} | {c['policy']} | {c['target']} | {c['value']} | {c['limit']} | {met} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Reload time (idle and under load, per policy) against size, with the bare load."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure: Any
    figure, ax = plt.subplots(figsize=(7, 4.5))
    gb = [row["weights_gb"] for row in rows]
    ax.plot(gb, [r["bare"]["total_s"] for r in rows], "k--", marker="o", label="bare warm load")
    ax.plot(gb, [r["bare"]["load_s"] for r in rows], "k:", marker=".", label="bare from_pretrained")
    policies = sorted({p for r in rows for p in r["policies"]})
    for policy in policies:
        for phase, style in (("idle", "-"), ("load", "-.")):
            ys = [r["policies"][policy][phase]["live_s_median"] for r in rows]
            ax.plot(gb, ys, style, marker="s", label=f"{policy}, {phase}: trigger to live")
    ax.set_xlabel("weights (GB, float32)")
    ax.set_ylabel("seconds (median)")
    ax.set_title("hotweights reload against model size", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], started: float) -> int:
    import platform

    import torch

    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    command = " ".join(["python bench/reload_sizes.py", *sys.argv[1:]])
    wall = round(time.monotonic() - started, 1)
    checks = targets(rows)
    document = {
        "benchmark": "reload_sizes",
        "date": date,
        "wall_s": wall,
        "command": command,
        "machine": {
            "platform": platform.platform(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "out")},
        "prompt": PROMPT,
        "sizes": rows,
        "targets": checks,
    }
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "reload_sizes.json").write_text(json.dumps(document, indent=1, default=str))
    text = f"Reload sizes, {date}; `{command}`; wall {wall} s\n\n{_markdown(rows, checks)}\n"
    (out / "reload_sizes.md").write_text(text)
    png = _plot(rows, out / "reload_sizes.png")
    print(text)
    print(f"wrote {out / 'reload_sizes.json'}, {out / 'reload_sizes.md'}, {png}")
    missed = [c for c in checks if c["met"] is False]
    return 1 if any(c["target"] == "failed requests" for c in missed) else 0


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
