"""What a reload running beside a request costs that request, by where the load runs.

One process serves greedy 8-token requests from a 25 M-parameter Qwen3-style model (the
model of `reload_under_load.py`, built on the spot), one after another, with one torch
thread, as `hotweights serve` does under load, with the heap frozen as it freezes it.
Beside them, loads of the same checkpoint
repeat without pause (then are unloaded): on a thread of this process
(`TransformersLoader(load_in="thread")`, the way the reloader ran them before), in the helper
process (`load_in="process"`), or not at all. Reported: request latency p50 and max in each
case, interleaved rounds, and the ratio to the idle case measured in the same run.

Also measured: the cost of one unload's full `gc.collect()`, before and after
`gc.freeze()` (what `hotweights serve` does before its first load).

    python bench/load_interference.py [--requests 12] [--rounds 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12, help="requests per case and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "load_interference.json")
    args = parser.parse_args()

    import torch

    from hotweights.backends import LoadedLM, TransformersLoader
    from hotweights.demo.tinylm import save_tiny_model
    from hotweights.generation import GenerationParams
    from peers.model import bench_shape

    torch.set_num_threads(1)
    shape = bench_shape()
    with tempfile.TemporaryDirectory(prefix="hotweights-interference-") as tmp:
        source = str(save_tiny_model(Path(tmp) / "model", seed=1, shape=shape))
        serving = TransformersLoader()
        model: LoadedLM = serving.load(source)
        serving.validate(model)
        serving.warmup(model)
        collect = _collect_cost()
        gc.freeze()  # as `hotweights serve` does: each unload's collection is then cheap
        params = GenerationParams(temperature=0.0, max_tokens=8)

        def request() -> float:
            started = time.perf_counter()
            for _ in model.stream("The quick brown fox", params):
                pass
            return time.perf_counter() - started

        loaders = {
            "thread": TransformersLoader(load_in="thread"),
            "process": TransformersLoader(load_in="process"),
        }
        loaders["process"].import_libraries()
        loaders["process"].unload(loaders["process"].load(source))  # the helper is up
        latencies: dict[str, list[float]] = {"idle": [], "thread": [], "process": []}
        loads: dict[str, list[float]] = {"thread": [], "process": []}
        for _ in range(args.rounds):
            for case in latencies:
                loader = loaders.get(case)
                latencies[case] += _beside(request, loader, source, args.requests, loads)
        loaders["process"].close()

    idle = statistics.median(latencies["idle"])
    result: dict[str, Any] = {
        "benchmark": "load_interference",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(["python", *sys.argv]),
        "machine": {"python": platform.python_version(), "cpus": _cpus()},
        "cases": {
            case: {
                "p50_ms": round(1000 * statistics.median(values), 1),
                "max_ms": round(1000 * max(values), 1),
                "p50_ratio_to_idle": round(statistics.median(values) / idle, 2),
                "load_ms_median": (
                    round(1000 * statistics.median(loads[case]), 1) if case in loads else None
                ),
                "requests": len(values),
            }
            for case, values in latencies.items()
        },
        "gc_collect_ms": collect,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(_markdown(result))
    return 0


def _beside(
    request: Any, loader: Any, source: str, count: int, loads: dict[str, list[float]]
) -> list[float]:
    """`count` request latencies while `loader` (None: nothing) loads `source` in a loop."""
    stop = threading.Event()
    running = threading.Event()

    def reload_forever() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            loaded = loader.load(source)
            loads[loader.load_in].append(time.perf_counter() - started)
            running.set()
            loader.unload(loaded)

    worker = threading.Thread(target=reload_forever) if loader is not None else None
    if worker is not None:
        worker.start()
        running.wait(120)  # measure from the second load on: the loop is under way
    values = [request() for _ in range(count)]
    stop.set()
    if worker is not None:
        worker.join()
    return values


def _collect_cost() -> dict[str, float]:
    """One full collection with this process's heap, then after freezing it."""
    started = time.perf_counter()
    gc.collect()
    plain = time.perf_counter() - started
    tracked = len(gc.get_objects())
    gc.freeze()
    started = time.perf_counter()
    gc.collect()
    frozen = time.perf_counter() - started
    gc.unfreeze()
    return {
        "objects": tracked,
        "full_collect_ms": round(1000 * plain, 1),
        "after_freeze_ms": round(1000 * frozen, 2),
    }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        f"load interference, {result['date']}; `{result['command']}`",
        "",
        "| loads beside the requests | request p50 (ms) | max (ms) | p50 / idle | one load (ms) |",
        "|---|---|---|---|---|",
    ]
    names = {"idle": "none", "thread": "on a thread here", "process": "in the helper process"}
    for case, row in result["cases"].items():
        load = row["load_ms_median"] if row["load_ms_median"] is not None else "–"
        lines.append(
            f"| {names[case]} | {row['p50_ms']} | {row['max_ms']} "
            f"| {row['p50_ratio_to_idle']} | {load} |"
        )
    collect = result["gc_collect_ms"]
    lines += [
        "",
        f"gc.collect() over {collect['objects']} objects: {collect['full_collect_ms']} ms; "
        f"after gc.freeze(): {collect['after_freeze_ms']} ms",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
