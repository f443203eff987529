"""What admission costs: one lease acquire plus release, idle and while reloads spin.

Measured from 1 and from 16 threads, next to a bare `threading.Lock` acquire plus release
in the same run. Each figure is CPU time of the client threads per operation
(`time.thread_time_ns`), so it is the cost of admission itself, not time spent waiting for
the GIL while the reload thread runs; wall-clock throughput is reported beside it.

    python bench/core_overhead.py [--ops 1000000] [--json bench/results/core_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hotweights.core import Reloader


class _TrivialLoader:
    def load(self, source: str) -> object:
        return object()

    def validate(self, model: object) -> None:
        pass

    def warmup(self, model: object) -> None:
        pass

    def unload(self, model: object) -> None:
        pass


def _run_threads(threads: int, ops: int, op: Callable[[], None]) -> tuple[float, float]:
    """Run `op` `ops` times in total across `threads` threads; return (cpu ns/op, wall ns/op)."""
    per_thread = ops // threads
    barrier = threading.Barrier(threads + 1)
    cpu_ns = [0] * threads

    def client(index: int) -> None:
        barrier.wait()
        started = time.thread_time_ns()
        for _ in range(per_thread):
            op()
        cpu_ns[index] = time.thread_time_ns() - started

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    wall_started = time.perf_counter_ns()
    for worker in workers:
        worker.join()
    wall = time.perf_counter_ns() - wall_started
    total = per_thread * threads
    return sum(cpu_ns) / total, wall / total


def measure(ops: int) -> dict[str, object]:
    reloader: Reloader[object] = Reloader(_TrivialLoader(), drain_timeout=5.0)
    reloader.reload("v0")
    slot = reloader.slot
    lock = threading.Lock()

    def lease_op() -> None:
        slot.acquire().release()

    def lock_op() -> None:
        lock.acquire()
        lock.release()

    spinning = threading.Event()
    reloads = 0

    def spin_reloads() -> None:
        nonlocal reloads
        while spinning.is_set():
            reloader.reload(f"v{reloads % 2 + 1}-{reloads}")
            reloads += 1

    rows: list[dict[str, object]] = []
    for threads in (1, 16):
        lock_cpu, lock_wall = _run_threads(threads, ops, lock_op)
        idle_cpu, idle_wall = _run_threads(threads, ops, lease_op)
        spinning.set()
        spinner = threading.Thread(target=spin_reloads)
        before = reloads
        spinner.start()
        busy_cpu, busy_wall = _run_threads(threads, ops, lease_op)
        spinning.clear()
        spinner.join()
        rows.append(
            {
                "threads": threads,
                "lock_ns": round(lock_cpu, 1),
                "lease_idle_ns": round(idle_cpu, 1),
                "lease_reloading_ns": round(busy_cpu, 1),
                "idle_vs_lock": round(idle_cpu / lock_cpu, 2),
                "reloading_vs_idle": round(busy_cpu / idle_cpu, 2),
                "reloads_during_run": reloads - before,
                "wall_ns": {
                    "lock": round(lock_wall, 1),
                    "idle": round(idle_wall, 1),
                    "reloading": round(busy_wall, 1),
                },
            }
        )
    reloader.close(timeout=10)
    return {
        "benchmark": "core_overhead",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "ops_per_case": ops,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=1_000_000)
    parser.add_argument("--json", type=Path, default=Path("bench/results/core_overhead.json"))
    args = parser.parse_args()
    result = measure(args.ops)
    print("| threads | lock ns | lease idle ns | lease reloading ns | idle/lock |", end="")
    print(" reloading/idle | reloads |")
    print("|---|---|---|---|---|---|---|")
    for row in result["rows"]:  # type: ignore[attr-defined]
        print(
            f"| {row['threads']} | {row['lock_ns']} | {row['lease_idle_ns']} | "
            f"{row['lease_reloading_ns']} | {row['idle_vs_lock']}x | "
            f"{row['reloading_vs_idle']}x | {row['reloads_during_run']} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
