"""Generation throughput: hotweights' batched engine next to llama.cpp's `llama-server` and
`transformers serve --continuous-batching` (on its defaults and tuned for this CPU), on
the same weights, prompts and concurrency, in one run.

Every server serves one Qwen3-style model (issue #22's: hidden 1024, 8 layers, ~90 M
parameters, float32, random weights, the byte-level tokenizer; built on the spot and
cached; llama.cpp gets it as an f32 GGUF), on the CPU, one server at a time, each warmed
with a few requests first. Closed-loop clients send greedy chat completions of
`--tokens` tokens, non-streamed, then streamed (see peers/chat_load.py). Reported per
system and concurrency: tokens/s, TTFT p50/p99, the gap between chunks p50/p99, request
latency p50 and peak RSS of the server's process tree. `llama-server` is restarted for
each concurrency with `-np` equal to it. Then hotweights alone: `--reload-streams`
streams while `--reloads` reloads alternate two weight sets: failed requests, streams
that saw two generations, gap p99 inside reload windows over steady. Last, issue #22's
targets as ratios, each MET or MISSED.

The peers install into cached environments in ~/.cache/hotweights/bench-peers on first
use: transformers serve (torch 2.13.0, this transformers, `transformers[serving]`,
accelerate; about 5 minutes) and llama.cpp (built from source, peers/llama_cpp.py;
about 5 minutes on 2 idle cores).

    python bench/throughput.py [--concurrency 1 4 16 32] [--tokens 64] [--peers ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from hotweights.demo.tinylm import TinyShape  # noqa: E402
from peers import llama_cpp  # noqa: E402
from peers.chat_load import PROMPTS, body, closed_loop, streams_across_reloads, summarize  # noqa: E402
from peers.loadgen import RssSampler  # noqa: E402
from peers.procs import (  # noqa: E402
    ensure_venv,
    free_port,
    spawn,
    stop_group,
    wait_http,
    wait_quiet,
)
from peers.report import commit  # noqa: E402
from peers.system import PeerUnavailable  # noqa: E402
from peers.throughput_report import markdown, targets  # noqa: E402

CACHE = Path.home() / ".cache" / "hotweights" / "bench-peers"
MODEL = (
    "Model: Qwen3-style, hidden 1024, 8 layers, intermediate 2816, 16 heads, 4 KV heads, "
    "head size 64, tied embeddings, byte-level tokenizer (259 tokens), ~90 M parameters, "
    "float32, random weights (issue #22's)"
)
PEERS = ("llama.cpp", "transformers-cb", "transformers-cb-tuned")
# transformers' continuous batching tuned for this CPU and workload. Its defaults size the
# cache from "available memory" and take 8192 tokens per step with 256-token pages: on a
# CPU that reserves gigabytes, builds attention masks of steps x cache tokens, and gives
# every ~130-token request a 256-token page. Here: 32-token pages (a request of ~70 prompt
# + 64 completion tokens takes 5), 256 of them (8192 tokens, 2x what 32 such requests
# hold; 128 MiB of float32 KV for this model), and at most 512 tokens per step (32 decode
# rows plus about 7 prompts joining), so a wave of joins costs running streams a few
# short steps instead of one long one.
CB_TUNED = ("--cb-block-size", "32", "--cb-num-blocks", "256", "--cb-max-batch-tokens", "512")

Running = tuple[str, str, subprocess.Popen[bytes]]
"""A started server: its base URL, the model name clients send, its process."""


SHAPES = {
    # Issue #22's CPU model: ~90 M parameters.
    "90m": TinyShape(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    ),
    # For a GPU (bench/gpu_check.sh): ~0.94 B parameters, head size 128.
    "1b": TinyShape(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=1024,
    ),
}
MODELS = {
    "90m": MODEL,
    "1b": "Model: Qwen3-style, hidden 2048, 20 layers, intermediate 5632, 16 heads, 8 KV "
    "heads, head size 128, tied embeddings, byte-level tokenizer, ~0.94 B parameters, "
    "random weights",
}


def build_model(path: Path, seed: int, size: str) -> Path:
    if (path / "model.safetensors").exists():
        return path
    from hotweights.demo.tinylm import save_tiny_model

    return save_tiny_model(path, seed=seed, shape=SHAPES[size])


def measure(
    name: str, running: Running, levels: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    """Warm `running`, then each mode at each of `levels` clients; rows keyed `mode-clients`."""
    base, model, process = running
    asyncio.run(closed_loop(base, model, 4, 1, 8, False))  # warm: compile paths, fill pools
    rows: dict[str, Any] = {}
    for stream in (False, True):
        for concurrency in levels:
            per_client = max(2, args.min_requests // concurrency)
            quiet = wait_quiet(args.quiet_wait)  # other work on the machine skews every figure
            with RssSampler(process.pid, time.monotonic, interval=0.1) as rss:
                results, wall = asyncio.run(
                    closed_loop(base, model, concurrency, per_client, args.tokens, stream)
                )
            peak = max((size for _, size in rss.samples), default=0)
            row = summarize(results, wall) | {
                "peak_rss_mb": peak / 2**20,
                "cpu": rss.cpu,
                "busy_cores_before": quiet["busy_cores"],
            }
            key = f"{'stream' if stream else 'plain'}-{concurrency}"
            rows[key] = row
            print(
                f"{name:>22} {key:>10}: {row['tokens_per_s']:7.1f} tok/s  "
                f"failed {row['failed']}  ttft p50 {row['ttft_p50_s']}  "
                f"gap p99 {row['gap_p99_s']}  rss {row['peak_rss_mb']:.0f} MB"
                + (f"  errors {row['errors']}" if row["errors"] else ""),
                flush=True,
            )
    return rows


def agree(running: Running, tokens: int) -> dict[str, Any]:
    """One greedy request for the first prompt: the prompt tokens the server counted, its
    text, and each completion token's bytes where it returns logprobs (kept for a reader:
    servers report the bytes of a partial UTF-8 token differently). A server that refuses
    logprobs is asked without."""
    base, model, _ = running
    url = f"{base}/v1/chat/completions"
    request = body(model, PROMPTS[0], tokens, False)
    answer = httpx.post(url, json=request | {"logprobs": True}, timeout=300)
    if answer.status_code != 200:
        answer = httpx.post(url, json=request, timeout=300)
    data = answer.json()
    choice = (data.get("choices") or [{}])[0]
    content = (choice.get("logprobs") or {}).get("content")
    return {
        "prompt_tokens": data.get("usage", {}).get("prompt_tokens"),
        "completion_tokens": data.get("usage", {}).get("completion_tokens"),
        "text": (choice.get("message") or {}).get("content"),
        "token_bytes": [entry.get("bytes") for entry in content] if content else None,
    }


@contextmanager
def served(
    command: list[str | Path], ready: str, model: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[Running]:
    port = free_port()
    process = spawn([part if part != "{port}" else str(port) for part in command], log, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + ready, timeout=600, process=process, log=log)
        yield base, model, process
    finally:
        stop_group(process)


def hotweights_command(models: list[Path], args: argparse.Namespace) -> list[str | Path]:
    command: list[str | Path] = [
        sys.executable, "-m", "hotweights.cli", "serve", models[0], "--name", "bench",
        "--port", "{port}", "--max-batch-size", str(max(args.concurrency)),
        "--max-pending", "256", "--model-root", models[0].parent,
        "--device", args.device, "--dtype", args.dtype,
    ]  # fmt: skip
    helps = subprocess.run(
        [sys.executable, "-m", "hotweights.cli", "serve", "--help"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    if "--threads" in helps:  # torch intra-op threads, once the serve CLI has the flag
        command += ["--threads", str(args.hotweights_threads or args.threads)]
    return command


def transformers_command(
    model: Path, log: Path, args: argparse.Namespace, tuned: bool
) -> list[str | Path]:
    """`transformers serve`: `--transformers-cli` where given (a machine with no network),
    else from its cached environment, installed on first use."""
    import transformers

    cli: Path | None = args.transformers_cli
    if cli is None:
        python = ensure_venv(
            CACHE / "transformers-serve" / "venv",
            [
                ("torch==2.13.0",),
                (f"transformers[serving]=={transformers.__version__}", "accelerate"),
            ],
            timeout=1800,
            log=log.with_name("transformers-install.log"),
        )
        cli = python.with_name("transformers")
    return [
        cli, "serve", str(model), "--continuous-batching", "--device", args.device,
        "--host", "127.0.0.1", "--port", "{port}", "--dtype", args.dtype,
        *(CB_TUNED if tuned else ()),
    ]  # fmt: skip


def run_llama(
    model: Path, args: argparse.Namespace, log: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rows for every level, each from its own `llama-server -np LEVEL`; and the agreement."""
    cache = CACHE / "llama.cpp"
    binary = llama_cpp.server_binary(cache, log.with_name("llama-build.log"))
    gguf = llama_cpp.gguf_for(model, cache, log.with_name("llama-convert.log"))
    per_slot = llama_cpp.slot_context(args.prompt_tokens, args.tokens)
    rows: dict[str, Any] = {}
    seen: dict[str, Any] = {}
    for level in args.concurrency:
        command = llama_cpp.serve_command(
            binary, gguf, 0, parallel=level, threads=args.threads, per_slot=per_slot
        )
        command[command.index("--port") + 1] = "{port}"
        with served(command, "/health", "bench", log) as running:
            seen = seen or agree(running, args.tokens)
            rows |= measure("llama.cpp", running, [level], args)
    return rows, seen


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--min-requests", type=int, default=32, help="per concurrency level")
    parser.add_argument("--reload-streams", type=int, default=16)
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument("--steady", type=float, default=8.0, help="seconds between reloads")
    parser.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS))
    parser.add_argument("--peers-only", action="store_true", help="skip hotweights (debugging)")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="llama.cpp's -t, and hotweights' --threads where serve has it",
    )
    parser.add_argument(
        "--hotweights-threads",
        type=int,
        help="hotweights' --threads where it should differ from llama.cpp's -t",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=96,
        help="longest templated prompt, for llama.cpp's per-slot context",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="seconds to wait, before each level, for the machine's other work to calm down",
    )
    parser.add_argument("--model", choices=sorted(SHAPES), default="90m")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for every server")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--transformers-cli", type=Path, help="an installed `transformers` to run, not the cache's"
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "throughput.json")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    # A SIGTERM (`timeout`) unwinds, so the servers started so far are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = CACHE.parent / "throughput"
    models = [build_model(work / f"models-{args.model}" / str(n), n, args.model) for n in (1, 2)]
    report: dict[str, Any] = {
        "commit": commit(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/throughput.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "model": f"{MODELS[args.model]}; served as {args.dtype} on {args.device}",
        "tokens": args.tokens,
        "concurrency": args.concurrency,
        "systems": {},
        "about": {},
        "agreement": {},
        "unavailable": {},
    }
    systems, about = report["systems"], report["about"]

    def save() -> None:  # after every system: a run cut short keeps what it measured
        report["targets"] = targets(report)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=list))
        args.out.with_suffix(".md").write_text(markdown(report, report["targets"]))

    if not args.peers_only:
        hw_command = hotweights_command(models, args)
        shown = " ".join(str(part) for part in hw_command[4:]).replace("{port}", "PORT")
        about["hotweights"] = f"`hotweights serve {shown}`"
        with served(hw_command, "/ready", "bench", work / "hotweights.log") as running:
            report["agreement"]["hotweights"] = agree(running, args.tokens)
            systems["hotweights"] = measure("hotweights", running, args.concurrency, args)
            report["reloads"] = streams_across_reloads(
                running[0], models, args.reload_streams, args.reloads, args.steady, args.tokens
            )
            print(f"{'hotweights':>22} {'reloads':>10}: {report['reloads']}", flush=True)
        save()
    runs: dict[str, Callable[[], None]] = {
        "llama.cpp": lambda: _llama(report, models[0], args, work),
        "transformers-cb": lambda: _transformers(report, models[0], args, work, tuned=False),
        "transformers-cb-tuned": lambda: _transformers(report, models[0], args, work, tuned=True),
    }
    for name in args.peers:
        try:
            runs[name]()
        except PeerUnavailable as exc:
            print(f"{name} unavailable: {exc}", flush=True)
            report["unavailable"][name] = str(exc)[:500]
        save()
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def _llama(report: dict[str, Any], model: Path, args: argparse.Namespace, work: Path) -> None:
    rows, seen = run_llama(model, args, work / "llama-server.log")
    report["systems"]["llama.cpp"], report["agreement"]["llama.cpp"] = rows, seen
    per_slot = llama_cpp.slot_context(args.prompt_tokens, args.tokens)
    report["about"]["llama.cpp"] = (
        f"`llama-server` from llama-cpp-python {llama_cpp.VERSION}'s vendored source, f32 "
        f"GGUF, `-np` = clients, `-c` = clients x {per_slot}, `-t`/`-tb` {args.threads}, "
        "`--cont-batching --jinja` (the GGUF's chat template)"
    )


def _transformers(
    report: dict[str, Any], model: Path, args: argparse.Namespace, work: Path, *, tuned: bool
) -> None:
    name = "transformers-cb-tuned" if tuned else "transformers-cb"
    log = work / f"{name}.log"
    command = transformers_command(model, log, args, tuned)
    with served(command, "/health", str(model), log) as running:
        report["agreement"][name] = agree(running, args.tokens)
        report["systems"][name] = measure(name, running, args.concurrency, args)
    flags = " ".join(CB_TUNED) if tuned else "its defaults"
    report["about"][name] = f"`transformers serve --continuous-batching`, {args.dtype}, {flags}"


if __name__ == "__main__":
    raise SystemExit(main())
