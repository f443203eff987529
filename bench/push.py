"""From a trainer to live without a disk: `hotweights.push` against a bare warm load.

For each size (the reload benchmarks' models of about 1.3 and 4.3 GB of float32 weights,
two weight sets each; `--sizes 0.1GB` for a quick run) and each handover (`socket`: the
weights streamed over HTTP; `shared-memory`: written to /dev/shm and handed over by name):

- **baseline**: the bare warm load plus validate plus forward pass of `peers/bare_warm.py`
  (one process, one torch thread: what a user who restarts nothing would do by hand);
- **idle**: `hotweights serve` (availability) in a subprocess and `--pushes` pushes from
  another process (`peers/pusher.py`, weights already in its memory): call to live, the
  server's phases, and the server's peak RSS over its steady RSS;
- **under load**: `--capacity-clients` (8) closed-loop clients measure capacity, then an
  open loop at `--load-share` of it while `--pushes` more versions are pushed: failed
  requests and p99 in push windows over steady.

Targets (issue 24): push to live at most 2.0x the baseline; under load 0 failed and p99 at
most 1.5x steady; peak RSS during a push at most 2.1x steady. Writes
bench/results/push.{json,md}.

    python bench/push.py [--sizes 1.3GB,4.3GB] [--handovers socket,shared-memory]
        [--workdir DIR]  # keeps the models (shared with bench/reload_sizes.py's layout)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from peers.hotweights_server import HotweightsSystem, PushTrigger
from peers.loadgen import LoadSpec, MonotonicClock, RssSampler
from peers.procs import wait_quiet
from peers.report import commit
from peers.system import Workload
from reload_sizes import PROMPT, SEEDS, SHAPES, _bare, _build, _capacity, _under_load, _Versions

BENCH = Path(__file__).resolve().parent
HANDOVERS = ("socket", "shared-memory")
TARGETS = {"live_vs_baseline": 2.0, "p99_ratio": 1.5, "rss_peak_ratio": 2.1}


def main() -> int:
    args = _parser().parse_args()
    if args.torch_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hotweights-push-bench-"))
    started = time.monotonic()
    rows = [_size(size, args, workdir) for size in args.sizes.split(",") if size]
    checks = targets(rows)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    document = {"args": vars(args) | {"out": str(out)}, "rows": rows, "targets": checks}
    (out / "push.json").write_text(json.dumps(document, indent=2, default=str))
    (out / "push.md").write_text(_markdown(rows, checks, time.monotonic() - started))
    print((out / "push.md").read_text())
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1.3GB,4.3GB", help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--handovers", default=",".join(HANDOVERS))
    parser.add_argument("--pushes", type=int, default=3, help="pushes idle, and under load")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--capacity-clients", type=int, default=8)
    parser.add_argument("--capacity-seconds", type=float, default=20.0)
    parser.add_argument("--load-share", type=float, default=0.5)
    parser.add_argument("--min-gap", type=float, default=10.0)
    parser.add_argument("--tail", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--bare-runs", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--quiet-wait", type=float, default=60.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    return parser


def _size(size: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    root = workdir / size
    dirs = {
        weights: _build(root / str(seed), SHAPES[size], seed) for weights, seed in SEEDS.items()
    }
    weight_bytes = (dirs["A"] / "model.safetensors").stat().st_size
    wait_quiet(args.quiet_wait)
    bare = _bare(dirs["A"], args.bare_runs, args.device)
    print(f"{size}: {weight_bytes / 1e9:.2f} GB; bare {bare}", flush=True)
    runs = {
        handover: _handover(handover, dirs, root, args)
        for handover in args.handovers.split(",")
        if handover
    }
    return {"size": size, "weights_gb": round(weight_bytes / 1e9, 3), "bare": bare, "runs": runs}


def _handover(
    handover: str, dirs: dict[str, Path], root: Path, args: argparse.Namespace
) -> dict[str, Any]:
    versions = _Versions(dirs)
    system = HotweightsSystem("availability", PushTrigger(root, handover), root / "logs")
    workload = Workload(PROMPT, args.max_tokens)
    entry: dict[str, Any] = {}
    try:
        system.start(versions.next())
        wait_quiet(args.quiet_wait)
        entry["idle"] = _idle(system, versions, args.pushes)
        print(f"{size_label(dirs)} {handover}: idle {entry['idle']}", flush=True)
        capacity = asyncio.run(_capacity(system, workload, args))
        rate = round(capacity["req_per_s"] * args.load_share, 3)
        gap = max(args.min_gap, 3 * entry["idle"]["live_s_median"] + 4)
        spec = LoadSpec(rate, gap * (args.pushes + 1), 256, args.timeout)
        load_args = argparse.Namespace(**vars(args), reloads=args.pushes)
        entry["capacity"] = capacity
        entry["load"] = _under_load(system, versions, workload, spec, gap, load_args)
        f = entry["load"]["figures"]
        print(f"{handover}: {f['failed']} failed, p99 x{f['p99_ratio']}", flush=True)
    finally:
        system.stop()
    return entry


def size_label(dirs: dict[str, Path]) -> str:
    return dirs["A"].parent.name


def _idle(system: HotweightsSystem, versions: _Versions, count: int) -> dict[str, Any]:
    clock = MonotonicClock()
    lives: list[float] = []
    phases: dict[str, list[float]] = {}
    with RssSampler(system.server_pid(), clock) as sampler:
        steady = system.rss()
        for _ in range(count):
            result = system.reload(versions.next(), clock)
            if not result.ok:
                raise RuntimeError(f"push of version {result.version} failed: {result.detail}")
            lives.append(result.seconds)
            for name, seconds in result.server.get("phases", {}).items():
                phases.setdefault(name, []).append(float(seconds))
            if not system.settled(timeout=300):
                raise RuntimeError("the old version stayed resident")
    peak = max(b for _, b in sampler.samples)
    return {
        "live_s": [round(s, 3) for s in lives],
        "live_s_median": round(statistics.median(lives), 3),
        "phases_s_median": {k: round(statistics.median(v), 3) for k, v in phases.items()},
        "rss_steady_mb": round(steady / 2**20, 1),
        "rss_peak_mb": round(peak / 2**20, 1),
        "rss_peak_ratio": round(peak / steady, 3),
    }


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        for handover, run in row["runs"].items():
            f = run["load"]["figures"]
            for name, value, limit in (
                (
                    "push to live / bare load+validate+forward (idle)",
                    round(run["idle"]["live_s_median"] / row["bare"]["total_s"], 2),
                    TARGETS["live_vs_baseline"],
                ),
                ("failed requests under load", f["failed"], 0),
                ("p99 in push windows / steady", f["p99_ratio"], TARGETS["p99_ratio"]),
                ("peak RSS during a push / steady (idle)", run["idle"]["rss_peak_ratio"],
                 TARGETS["rss_peak_ratio"]),
            ):  # fmt: skip
                met = None if value is None else value <= limit
                out.append({"size": row["size"], "handover": handover, "target": name,
                            "value": value, "limit": limit, "met": met})  # fmt: skip
    return out


def _markdown(rows: list[dict[str, Any]], checks: list[dict[str, Any]], wall: float) -> str:
    lines = [
        f"# Push to live ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores; `python bench/push.py`, at {commit()}; wall {wall:.0f} s)",
        "",
        "| size | handover | baseline s (load + validate + forward) | push to live s "
        "(median) | server phases s | peak RSS / steady | under load: failed, p99 steady → "
        "push (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        bare = row["bare"]
        for handover, run in row["runs"].items():
            idle, f = run["idle"], run["load"]["figures"]
            phases = ", ".join(f"{k} {v}" for k, v in idle["phases_s_median"].items())
            lines.append(
                f"| {row['size']} ({row['weights_gb']} GB) | {handover} | {bare['total_s']} "
                f"({bare['load_s']} + {bare['validate_s']} + {bare['forward_s']}) | "
                f"{idle['live_s_median']} | {phases} | {idle['rss_peak_ratio']} | "
                f"{f['failed']} of {f['requests']}, {f['steady_p99_ms']} → {f['reload_p99_ms']} |"
            )
    lines += ["", "| size | handover | target | value | limit | met |", "|---|---|---|---|---|---|"]
    for check in checks:
        met = {True: "met", False: "**missed**", None: "n/a"}[check["met"]]
        lines.append(
            f"| {check['size']} | {check['handover']} | {check['target']} | {check['value']} "
            f"| {check['limit']} | {met} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
