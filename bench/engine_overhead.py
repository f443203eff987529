"""Engine overhead: the host time of one batched-engine step, where the model costs nearly
nothing.

A ~1 M-parameter Qwen3-style model (hidden 256, 1 layer, the byte-level tokenizer) is
loaded in-process, and `--rows` sequences (64) are submitted at once to one
`BatchEngine`, each generating `--tokens` tokens. The engine reports every pass to its
`on_step` observer; a full decode pass is one whose batch is every row and whose query
tokens are one per row. For each two consecutive full decode passes, the time between
their reports is one whole turn of the engine's loop (sampling, delivery, scheduling
and one forward), and forward hooks on the model time the forward inside it. Host time
per step is the turn minus its forward. Issue #22's target: at most 2 ms per step at 64
rows (judged on the mean, so that rare slow turns count). Work an engine does on another
thread (since 208ad5b, decoding text and delivering it) counts only as the time it keeps
the engine's thread waiting, for the GIL or otherwise: what stays between two passes.

Runs twice: greedy, and sampled (temperature 0.8, top_p 0.95, a seed per request), the
path that does per-row work in the engine this was written against. The sampled run
bans the end-of-sequence tokens (`logit_bias` -100): with random weights, sampling
would end rows within a few steps and leave no full batch to time.

    python bench/engine_overhead.py [--rows 64] [--tokens 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from peers.procs import wait_quiet  # noqa: E402
from peers.report import commit  # noqa: E402

TARGET_MS = 2.0


@dataclass
class Turns:
    """What one run saw: forward seconds as they happen, and each full decode turn."""

    rows: int
    forwards: list[float] = field(default_factory=list)
    turns: list[tuple[float, float]] = field(default_factory=list)
    """(wall seconds of the turn, forward seconds inside it)."""
    _last: float | None = None
    _forward_mark: int = 0
    _began: float = 0.0

    def before_forward(self, *_: Any) -> None:
        self._began = time.perf_counter()

    def after_forward(self, *_: Any) -> None:
        self.forwards.append(time.perf_counter() - self._began)

    def on_step(self, stats: Any) -> None:
        now = time.perf_counter()
        full = stats.batch == self.rows and stats.tokens == self.rows
        if full and self._last is not None:
            self.turns.append((now - self._last, sum(self.forwards[self._forward_mark :])))
        self._last = now if full else None
        self._forward_mark = len(self.forwards)


def build(path: Path) -> Any:
    from hotweights.backends import TransformersLoader
    from hotweights.demo.tinylm import TinyShape, save_tiny_model

    shape = TinyShape(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    save_tiny_model(path, seed=0, shape=shape)
    return TransformersLoader().load(str(path))


def run(lm: Any, rows: int, tokens: int, sampled: bool) -> Turns:
    from hotweights.engine.batching import BatchEngine, EngineLimits
    from hotweights.generation import GenerationParams

    turns = Turns(rows)
    hooks = [
        lm.model.register_forward_pre_hook(turns.before_forward),
        lm.model.register_forward_hook(turns.after_forward),
    ]
    engine = BatchEngine(lm, EngineLimits(max_batch=rows, columns=512), on_step=turns.on_step)
    left = rows
    lock = threading.Lock()
    done = threading.Event()

    def deliver(item: Any) -> None:
        nonlocal left
        if isinstance(item, BaseException) or item.finish_reason is not None:
            with lock:
                left -= 1
                if left == 0:
                    done.set()

    try:
        for i in range(rows):
            params = GenerationParams(
                temperature=0.8 if sampled else 0.0,
                top_p=0.95,
                seed=i,
                max_tokens=tokens,
                logit_bias=dict.fromkeys(lm.eos_ids, -100.0) if sampled else {},
            )
            engine.submit(lm.prompt_ids(f"Request {i}: tell me a story."), params, deliver)
        if not done.wait(600):
            raise TimeoutError("the engine did not finish in 600 s")
    finally:
        engine.stop(timeout=30)
        for hook in hooks:
            hook.remove()
    return turns


def summary(turns: Turns) -> dict[str, Any]:
    walls = [wall for wall, _ in turns.turns]
    forwards = [forward for _, forward in turns.turns]
    timed = bool(turns.forwards)
    hosts = [wall - forward for wall, forward in turns.turns] if timed else []

    def ms(values: list[float], how: str) -> float | None:
        if not values:
            return None
        value = statistics.fmean(values) if how == "mean" else statistics.median(values)
        return round(value * 1000, 3)

    host_mean = ms(hosts, "mean")
    return {
        "rows": turns.rows,
        "full_turns": len(walls),
        "turn_ms_mean": ms(walls, "mean"),
        "turn_ms_p50": ms(walls, "p50"),
        "forward_ms_mean": ms(forwards, "mean") if timed else None,
        "host_ms_mean": host_mean,
        "host_ms_p50": ms(hosts, "p50"),
        "host_us_per_row": None if host_mean is None else round(host_mean * 1000 / turns.rows, 1),
        "met": None if host_mean is None else host_mean <= TARGET_MS,
    }


def markdown(report: dict[str, Any]) -> str:
    marks = {True: "MET", False: "**MISSED**", None: "n/a (no forward timed)"}
    lines = [
        "# Engine overhead: host time per batched step",
        "",
        f"Measured at {report['commit']} on {report['date']}. {report['model']}; "
        f"{report['rows']} rows, {report['tokens']} tokens each, torch threads "
        f"{report['threads']}. Produced by `{report['command']}`. Host time = one full "
        "decode turn of the engine's loop minus the model's forward inside it "
        f"(bench/engine_overhead.py). Target (issue #22): mean ≤ {TARGET_MS} ms. *Busy before*: "
        "cores the rest of the machine kept busy as a run began.",
        "",
        "| sampling | turns | turn mean / p50 ms | forward mean ms | host mean / p50 ms "
        "| host per row µs | target | busy before |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["runs"].items():
        lines.append(
            f"| {name} | {row['full_turns']} | {row['turn_ms_mean']} / {row['turn_ms_p50']} "
            f"| {row['forward_ms_mean']} | {row['host_ms_mean']} / {row['host_ms_p50']} "
            f"| {row['host_us_per_row']} | {marks[row['met']]} | {row['busy_cores_before']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--quiet-wait", type=float, default=30.0, help="seconds to wait for a quiet machine"
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "engine_overhead.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        lm = build(Path(scratch) / "model")
    parameters = sum(p.numel() for p in lm.model.parameters())
    run(lm, args.rows, 16, sampled=False)  # warm: first passes allocate and dispatch slowly
    report: dict[str, Any] = {
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/engine_overhead.py " + " ".join(sys.argv[1:]),
        "model": f"Qwen3-style, hidden 256, 1 layer, {parameters / 1e6:.2f} M parameters, float32",
        "rows": args.rows,
        "tokens": args.tokens,
        "threads": args.threads,
        "runs": {},
    }
    for name, sampled in (("greedy", False), ("sampled", True)):
        busy = wait_quiet(args.quiet_wait)["busy_cores"]  # other work skews a host timing
        row = summary(run(lm, args.rows, args.tokens, sampled)) | {"busy_cores_before": busy}
        report["runs"][name] = row
        print(f"{name:>8}: {row}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
