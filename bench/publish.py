"""From a checkpoint directory to live: `hotweights publish` into a watched repository,
per publish mode, against a bare warm load plus validate plus one forward pass.

For each size (the models of `reload_sizes.py`: about 0.1, 1.3 and 4.3 GB of float32
weights, two weight sets each) and each mode (`copy`, `--link`, `--move`):

- **baseline**: `peers/bare_warm.py` on the same checkpoint (`from_pretrained`, the
  validate-equivalent forward pass, one more forward), median of `--bare-runs`;
- **publish to live**: `hotweights serve --repo` watching a repository (file events);
  `--publishes` times a fresh checkpoint directory is written beside the repository (same
  filesystem, warm page cache, as a training job leaves it; untimed), then timed from
  the start of `hotweights publish` to the server's own end of the reload it triggers:
  the publish command, the watcher noticing, and the reload's phases (load with its
  digest check, validate, warmup, swap).

The target of issue 24: publish to live at most 2.0x the baseline (with `--link` or
`--move`; the copy's figure is reported too). Writes bench/results/publish.{json,md}.
Every server and bare load runs with `--torch-threads` torch threads.

    python bench/publish.py [--sizes 0.1GB,1.3GB,4.3GB] [--modes copy,link,move]
        [--publishes 3] [--workdir DIR] [--quiet-wait 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peers.hotweights_server import HotweightsSystem, PublishTrigger
from peers.loadgen import MonotonicClock
from peers.procs import wait_quiet
from peers.report import commit
from peers.system import ModelVersion
from reload_sizes import SEEDS, SHAPES, _bare, _build

BENCH = Path(__file__).resolve().parent
MODES = ("copy", "link", "move")
TARGET = 2.0
"""Publish to live over the bare warm load + validate + forward, with link or move."""


def main() -> int:
    args = _parser().parse_args()
    if args.torch_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
    sizes = [s for s in args.sizes.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    for size in sizes:
        if size not in SHAPES:
            raise SystemExit(f"unknown size {size!r}; choose from {', '.join(SHAPES)}")
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hotweights-publish-"))
    try:
        rows = [_size(size, modes, args, workdir) for size in sizes]
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return _write(args, rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1.3GB,4.3GB", help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--publishes", type=int, default=3, help="timed publishes per mode")
    parser.add_argument("--policy", default="availability")
    parser.add_argument("--bare-runs", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--quiet-wait", type=float, default=60.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", help="keep (and reuse) the models here")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    return parser


def _size(size: str, modes: list[str], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    root = workdir / size
    sets = {
        weights: _build(root / str(seed), SHAPES[size], seed) for weights, seed in SEEDS.items()
    }
    weight_bytes = (sets["A"] / "model.safetensors").stat().st_size
    _say(f"{size}: {weight_bytes / 1e9:.2f} GB of weights; bare warm load")
    wait_quiet(args.quiet_wait)
    bare = _bare(sets["A"], args.bare_runs, args.device)
    baseline = bare["load_s"] + bare["validate_s"] + bare["forward_s"]
    _say(f"{size}: bare {baseline:.3f} s (load + validate + forward)")
    runs = {mode: _mode(mode, sets, root / mode, args) for mode in modes}
    for entry in runs.values():
        median = entry.get("live_s_median")
        entry["vs_baseline"] = round(median / baseline, 2) if median else None
    return {
        "size": size,
        "weights_gb": round(weight_bytes / 1e9, 3),
        "bare": bare,
        "baseline_s": round(baseline, 4),
        "modes": runs,
    }


def _mode(mode: str, sets: dict[str, Path], root: Path, args: argparse.Namespace) -> dict[str, Any]:
    shutil.rmtree(root, ignore_errors=True)
    repo, checkpoints = root / "repo", root / "checkpoints"
    trigger = PublishTrigger(repo, root / "logs" / "publish.log", mode=mode)
    device = None if args.device == "cpu" else args.device
    system = HotweightsSystem(args.policy, trigger, root / "logs", device=device)
    reloads: list[dict[str, Any]] = []
    try:
        system.start(_checkpoint(sets, checkpoints, 1))
        for number in range(2, args.publishes + 2):
            version = _checkpoint(sets, checkpoints, number)
            wait_quiet(args.quiet_wait)
            result = system.reload(version, MonotonicClock())
            if not result.ok:
                raise SystemExit(f"{mode}: version {number} did not go live: {result.detail}")
            event = result.server
            reloads.append(
                {
                    "live_s": round(result.seconds, 4),
                    "publish_s": event.get("publish_s"),
                    "notice_s": event.get("notice_s"),
                    "phases": event.get("phases", {}),
                }
            )
            _say(f"{mode}: version {number} live {result.seconds:.3f} s after publish started")
            system.settled()
            trigger.prune(number)
            shutil.rmtree(version.path, ignore_errors=True)
    finally:
        system.stop()
    lives = [r["live_s"] for r in reloads]
    return {
        "reloads": reloads,
        "live_s_median": round(statistics.median(lives), 4) if lives else None,
        "publish_s_median": _median(r["publish_s"] for r in reloads),
    }


def _checkpoint(sets: dict[str, Path], checkpoints: Path, number: int) -> ModelVersion:
    """A fresh copy of one weight set, as a trainer would have written it: beside the
    repository, in the page cache."""
    weights = "A" if number % 2 else "B"
    path = checkpoints / f"step-{number}"
    shutil.copytree(sets[weights], path)
    return ModelVersion(number, path, weights)


def _median(values: Any) -> float | None:
    found = [v for v in values if v is not None]
    return round(statistics.median(found), 4) if found else None


def _write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "bench/publish.py", *sys.argv[1:]])
    document = {"command": command, "created": time.time(), "rows": rows, "target": TARGET}
    (args.out / "publish.json").write_text(json.dumps(document, indent=2) + "\n")
    lines = [
        "# Publish to live",
        "",
        f"`{command}`, at {commit()}",
        "",
        "| size | mode | bare load+validate+forward (s) | publish to live (s) "
        "| of which publish (s) | ratio | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for mode, entry in row["modes"].items():
            ratio = entry["vs_baseline"]
            met = "" if mode == "copy" else ("met" if ratio and ratio <= TARGET else "missed")
            lines.append(
                f"| {row['size']} | {mode} | {row['baseline_s']} | {entry['live_s_median']} "
                f"| {entry['publish_s_median']} | {ratio}x | {met} (<= {TARGET}x) |"
            )
    (args.out / "publish.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _say(message: str) -> None:
    print(f"[publish] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
