"""What a reload's load costs the requests beside it, by where the load runs, at two sizes.

One process serves greedy requests (`--tokens` tokens each) from a Qwen3-style model built on
the spot, one after another on a thread, with one torch thread, as `hotweights serve` does
under load, with the heap frozen as it freezes it. Beside them, single loads of a second copy
of the checkpoint, one every `--gap` seconds (then unloaded), as reloads happen: on a thread
of this process (`TransformersLoader(load_in="thread")`: transformers maps the file, then
the weights are read into private memory) or in the helper process (`load_in="process"`:
the helper reads the checkpoint and hands the weights over in shared memory). Reported for
each: one load's median time, and the requests that overlapped a load (their p50 and max,
and the extra seconds they took over the steady p50, per load), against the requests that
overlapped none. Two sizes (`--sizes`): the reload benchmark's 25 M-parameter model (97 MB)
and a wide model of 1.3 GB (330 M parameters: hidden 2048, 7 layers).

Also measured: the cost of one unload's full `gc.collect()`, before and after
`gc.freeze()` (what `hotweights serve` does before its first load).

    python bench/load_interference.py [--loads 6] [--gap 1.0] [--sizes 97MB,1.3GB]
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
    parser.add_argument("--loads", type=int, default=6, help="loads per case and size")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between two loads")
    parser.add_argument("--tokens", type=int, default=2, help="tokens per request")
    parser.add_argument("--sizes", default="97MB,1.3GB")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "load_interference.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    collect = _collect_cost()
    gc.freeze()  # as `hotweights serve` does: each unload's collection is then cheap
    sizes = {}
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory(prefix="hotweights-interference-") as tmp:
            sizes[size] = _measure(Path(tmp), size, args)
    result: dict[str, Any] = {
        "benchmark": "load_interference",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(["python", *sys.argv]),
        "machine": {"python": platform.python_version(), "cpus": _cpus()},
        "sizes": sizes,
        "gc_collect_ms": collect,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(_markdown(result))
    return 0


def _shape(size: str) -> Any:
    from hotweights.demo.tinylm import TinyShape
    from peers.model import bench_shape

    if size == "97MB":
        return bench_shape()
    if size == "380MB":
        return TinyShape(1024, 2816, 8, 16, 8, 1024)
    if size == "1.3GB":
        return TinyShape(2048, 5632, 7, 16, 8, 1024)
    raise SystemExit(f"unknown size {size!r}: 97MB, 380MB or 1.3GB")


def _measure(tmp: Path, size: str, args: argparse.Namespace) -> dict[str, Any]:
    from hotweights.backends import LoadedLM, TransformersLoader
    from hotweights.demo.tinylm import save_tiny_model
    from hotweights.generation import GenerationParams

    served = str(save_tiny_model(tmp / "served", seed=1, shape=_shape(size)))
    source = str(save_tiny_model(tmp / "next", seed=2, shape=_shape(size)))
    serving = TransformersLoader()
    model: LoadedLM = serving.load(served)
    serving.validate(model)
    serving.warmup(model)
    params = GenerationParams(temperature=0.0, max_tokens=args.tokens)
    spans: list[tuple[float, float]] = []
    stop = threading.Event()

    def requests() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            for _ in model.stream("The quick brown fox", params):
                pass
            spans.append((started, time.perf_counter()))

    loaders = {
        "thread": TransformersLoader(load_in="thread"),
        "process": TransformersLoader(load_in="process"),
    }
    loaders["process"].import_libraries()
    for loader in loaders.values():  # the helper is up, the files are in the page cache
        loader.unload(loader.load(source))
    windows: dict[str, list[tuple[float, float]]] = {case: [] for case in loaders}
    client = threading.Thread(target=requests)
    client.start()
    time.sleep(args.gap)
    for _ in range(args.loads):  # interleaved: both cases see the same machine
        for case, loader in loaders.items():
            started = time.perf_counter()
            loaded = loader.load(source)
            windows[case].append((started, time.perf_counter()))
            loader.unload(loaded)
            time.sleep(args.gap)
    stop.set()
    client.join()
    loaders["process"].close()
    serving.unload(model)

    def overlaps(span: tuple[float, float], case: str) -> bool:
        return any(span[0] < end and span[1] > begin for begin, end in windows[case])

    steady = [
        end - begin for begin, end in spans if not any(overlaps((begin, end), c) for c in windows)
    ]
    p50 = statistics.median(steady)
    cases: dict[str, Any] = {
        "steady": {"requests": len(steady), "p50_ms": _ms(p50), "max_ms": _ms(max(steady))}
    }
    for case in loaders:
        inside = [end - begin for begin, end in spans if overlaps((begin, end), case)]
        loads = [end - begin for begin, end in windows[case]]
        cases[case] = {
            "load_ms_median": _ms(statistics.median(loads)),
            "requests": len(inside),
            "p50_ms": _ms(statistics.median(inside)),
            "max_ms": _ms(max(inside)),
            "extra_ms_per_load": _ms(sum(max(0.0, t - p50) for t in inside) / len(loads)),
        }
    weights = Path(source) / "model.safetensors"
    return {"bytes": weights.stat().st_size, "cases": cases}


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 1)


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
        "| size | loads | one load (ms) | requests beside loads | p50 (ms) | max (ms) "
        "| extra per load (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"steady": "none (steady)", "thread": "on a thread here", "process": "helper process"}
    for size, measured in result["sizes"].items():
        for case, row in measured["cases"].items():
            load = row.get("load_ms_median", "-")
            extra = row.get("extra_ms_per_load", "-")
            lines.append(
                f"| {size} | {names[case]} | {load} | {row['requests']} | {row['p50_ms']} "
                f"| {row['max_ms']} | {extra} |"
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
