"""Generation throughput: hotweights' batched engine next to `transformers serve
--continuous-batching`, on the same model, prompts and concurrency, in one run.

Both servers serve one ~76 M-parameter Qwen3-style model (float32, random weights, the
byte-level tokenizer; built on the spot and cached), on the CPU, one after the other,
each warmed with a few requests first. Closed-loop clients (each sends its next request
when the last one ended) send greedy chat completions of `--tokens` tokens, non-streamed,
then streamed. Reported per system and concurrency: output tokens/s, time to first token
p50/p99 (streamed), inter-token latency p99 (streamed), request latency p50, peak RSS of
the server's process tree. Then hotweights alone: `--reload-streams` streams while
`--reloads` reloads alternate two weight sets (`POST /admin/reload`): failed requests,
streams that saw two generations, inter-token p99 inside reload windows over steady.

transformers serve runs from its own cached environment (torch 2.13.0, the same
transformers, `transformers[serving]` and accelerate), in ~/.cache/hotweights/bench-peers.

    python bench/throughput.py [--concurrency 1 4 16 32] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from peers.loadgen import RssSampler  # noqa: E402
from peers.procs import ensure_venv, free_port, spawn, stop_group, wait_http  # noqa: E402

CACHE = Path.home() / ".cache" / "hotweights" / "bench-peers"
PROMPTS = [
    "Tell me about the sea.",
    "Write a short poem about mountains.",
    "What is the capital of France, and why?",
    "List three colours.",
    "Explain how a bicycle works.",
    "Describe your favourite meal in detail.",
    "Count from one to ten.",
    "Why is the sky blue?",
]


@dataclass
class Result:
    """One request as a client saw it."""

    ok: bool
    tokens: int
    latency: float
    first: float | None = None
    gaps: list[float] = field(default_factory=list)
    generations: set[str] = field(default_factory=set)
    started: float = 0.0
    stamps: list[float] = field(default_factory=list)


def build_model(path: Path, seed: int) -> Path:
    """The benchmark model: hidden 768, 12 layers, 12 heads, 4 KV heads (~76 M parameters)."""
    if (path / "model.safetensors").exists():
        return path
    from hotweights.demo.tinylm import TinyShape, save_tiny_model

    shape = TinyShape(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    return save_tiny_model(path, seed=seed, shape=shape)


async def one(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int, stream: bool
) -> Result:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": stream,
    }
    if stream:  # count tokens from usage: a chunk can hold several (bytes of one character)
        body["stream_options"] = {"include_usage": True}
    began = time.perf_counter()
    try:
        if not stream:
            response = await client.post(url, json=body)
            data = response.json()
            ok = response.status_code == 200 and "choices" in data
            count = data.get("usage", {}).get("completion_tokens", 0) if ok else 0
            result = Result(ok, count, time.perf_counter() - began, started=began)
            if GEN_HEADER in response.headers:
                result.generations.add(response.headers[GEN_HEADER])
            return result
        result = Result(True, 0, 0.0, started=began)
        last = began
        usage_tokens: int | None = None
        async with client.stream("POST", url, json=body) as response:
            result.ok = response.status_code == 200
            if GEN_HEADER in response.headers:
                result.generations.add(response.headers[GEN_HEADER])
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.ok = False
                    continue
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                fingerprint = chunk.get("system_fingerprint") or ""
                if fingerprint.startswith("hw-g"):  # hw-g3-1a2b3c4d names generation 3
                    result.generations.add(fingerprint.split("-")[1][1:])
                for choice in chunk.get("choices", []):
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if result.first is None:
                            result.first = now - began
                        else:
                            result.gaps.append(now - last)
                        result.stamps.append(now)
                        last = now
                        result.tokens += 1
        if usage_tokens is not None:
            result.tokens = usage_tokens
        result.latency = time.perf_counter() - began
        return result
    except httpx.HTTPError:
        return Result(False, 0, time.perf_counter() - began, started=began)


GEN_HEADER = "x-hotweights-generation"


async def closed_loop(
    base: str, model: str, concurrency: int, per_client: int, tokens: int, stream: bool
) -> tuple[list[Result], float]:
    url = f"{base}/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def client_loop(index: int) -> list[Result]:
            done = []
            for k in range(per_client):
                prompt = PROMPTS[(index + k) % len(PROMPTS)] + f" (client {index})"
                done.append(await one(client, url, model, prompt, tokens, stream))
            return done

        began = time.perf_counter()
        groups = await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
        return [r for group in groups for r in group], time.perf_counter() - began


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(results: list[Result], wall: float) -> dict[str, Any]:
    firsts = [r.first for r in results if r.first is not None]
    gaps = [gap for r in results for gap in r.gaps]
    return {
        "requests": len(results),
        "failed": sum(not r.ok for r in results),
        "tokens": sum(r.tokens for r in results),
        "tokens_per_s": sum(r.tokens for r in results) / wall,
        "wall_s": wall,
        "latency_p50_s": pct([r.latency for r in results], 0.5),
        "ttft_p50_s": pct(firsts, 0.5),
        "ttft_p99_s": pct(firsts, 0.99),
        "itl_p99_s": pct(gaps, 0.99),
    }


def sweep(name: str, base: str, model: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    asyncio.run(closed_loop(base, model, 4, 1, 8, False))  # warm: compile paths, fill pools
    rows: dict[str, Any] = {}
    for stream in (False, True):
        for concurrency in args.concurrency:
            per_client = max(2, args.min_requests // concurrency)
            with RssSampler(pid, time.monotonic, interval=0.1) as rss:
                results, wall = asyncio.run(
                    closed_loop(base, model, concurrency, per_client, args.tokens, stream)
                )
            peak = max((size for _, size in rss.samples), default=0)
            row = summarize(results, wall) | {"peak_rss_mb": peak / 2**20, "cpu": rss.cpu}
            key = f"{'stream' if stream else 'plain'}-{concurrency}"
            rows[key] = row
            print(
                f"{name:>22} {key:>10}: {row['tokens_per_s']:7.1f} tok/s  "
                f"failed {row['failed']}  ttft p50 {row['ttft_p50_s']}  "
                f"rss {row['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    return rows


def run_hotweights(models: list[Path], args: argparse.Namespace, log: Path) -> dict[str, Any]:
    port = free_port()
    command: list[str | Path] = [
        sys.executable, "-m", "hotweights.cli", "serve", models[0], "--name", "bench",
        "--port", str(port), "--max-batch-size", str(max(args.concurrency)),
        "--max-pending", "256", "--model-root", models[0].parent,
    ]  # fmt: skip
    process = spawn(command, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/ready", timeout=300, process=process, log=log)
        rows = sweep("hotweights", base, "bench", process.pid, args)
        rows["reloads"] = reload_run(base, models, args)
        return rows
    finally:
        stop_group(process)


def reload_run(base: str, models: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """`--reload-streams` closed-loop streams; after a steady stretch, `--reloads` reloads."""
    windows: list[tuple[float, float]] = []

    async def drive() -> tuple[list[Result], float]:
        stop = asyncio.Event()
        url = f"{base}/v1/chat/completions"
        results: list[Result] = []
        async with httpx.AsyncClient(timeout=600) as client:

            async def streamer(index: int) -> None:
                k = 0
                while not stop.is_set():
                    prompt = PROMPTS[(index + k) % len(PROMPTS)] + f" (stream {index})"
                    results.append(await one(client, url, "bench", prompt, args.tokens, True))
                    k += 1

            async def reloads() -> None:
                await asyncio.sleep(args.steady)
                async with httpx.AsyncClient(timeout=600) as admin:
                    for i in range(args.reloads):
                        target = models[(i + 1) % len(models)]
                        began = time.perf_counter()
                        answer = await admin.post(
                            f"{base}/admin/reload", json={"path": str(target), "wait": True}
                        )
                        windows.append((began, time.perf_counter()))
                        if answer.status_code != 200:
                            print("reload failed:", answer.text[:300], flush=True)
                        await asyncio.sleep(args.steady / 2)
                stop.set()

            began = time.perf_counter()
            await asyncio.gather(reloads(), *(streamer(i) for i in range(args.reload_streams)))
            return results, time.perf_counter() - began

    results, wall = asyncio.run(drive())

    def in_window(stamp: float) -> bool:
        return any(start <= stamp <= end for start, end in windows)

    steady_gaps: list[float] = []
    window_gaps: list[float] = []
    for r in results:
        for stamp, gap in zip(r.stamps[1:], r.gaps, strict=True):
            (window_gaps if in_window(stamp) else steady_gaps).append(gap)
    steady, during = pct(steady_gaps, 0.99), pct(window_gaps, 0.99)
    row = {
        "streams": args.reload_streams,
        "reloads": len(windows),
        "requests": len(results),
        "failed": sum(not r.ok for r in results),
        "mixed_streams": sum(len(r.generations) > 1 for r in results),
        "generations_seen": sorted({g for r in results for g in r.generations}),
        "itl_p99_steady_s": steady,
        "itl_p99_reload_s": during,
        "itl_p99_ratio": (during / steady) if steady and during else None,
        "reload_window_s": [round(end - start, 3) for start, end in windows],
        "tokens_per_s": sum(r.tokens for r in results) / wall,
    }
    print(f"{'hotweights':>22} {'reloads':>10}: {row}", flush=True)
    return row


def run_transformers(model: Path, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    import transformers

    venv = CACHE / "transformers-serve" / "venv"
    python = ensure_venv(
        venv,
        [("torch==2.13.0",), (f"transformers[serving]=={transformers.__version__}", "accelerate")],
        timeout=1800,
        log=log.with_name("transformers-install.log"),
    )
    port = free_port()
    command: list[str | Path] = [
        python.with_name("transformers"), "serve", str(model), "--continuous-batching",
        "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
    ]  # fmt: skip
    process = spawn(command, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", timeout=300, process=process, log=log)
        return sweep("transformers serve --cb", base, str(model), process.pid, args)
    finally:
        stop_group(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--min-requests", type=int, default=32, help="per concurrency level")
    parser.add_argument("--reload-streams", type=int, default=16)
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument("--steady", type=float, default=8.0, help="seconds between reloads")
    parser.add_argument("--skip-peer", action="store_true", help="hotweights only")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "throughput.json")
    args = parser.parse_args()
    work = CACHE.parent / "throughput"
    models = [build_model(work / "models" / str(n), seed=n) for n in (1, 2)]
    report: dict[str, Any] = {
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "model": "Qwen3-style, hidden 768, 12 layers, ~76 M parameters, float32, random weights",
        "tokens": args.tokens,
        "concurrency": args.concurrency,
    }
    report["hotweights"] = run_hotweights(models, args, work / "hotweights.log")
    if not args.skip_peer:
        report["transformers_serve_cb"] = run_transformers(
            models[0], args, work / "transformers.log"
        )
        report["ratios"] = {
            key: row["tokens_per_s"] / peer["tokens_per_s"]
            for key, row in report["hotweights"].items()
            if (peer := report["transformers_serve_cb"].get(key)) and peer["tokens_per_s"]
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=list))
    write_markdown(report, args.out.with_suffix(".md"))
    print(f"wrote {args.out}")
    return 0


def write_markdown(report: dict[str, Any], path: Path) -> None:
    def fmt(value: Any, scale: float = 1.0, digits: int = 2) -> str:
        return "–" if value is None else f"{value * scale:.{digits}f}"

    lines = [
        "# Throughput: hotweights vs `transformers serve --continuous-batching`",
        "",
        f"{report['model']}; {report['tokens']} greedy tokens per request; "
        f"{report['machine']['cpus']} CPUs. Produced by `python bench/throughput.py`.",
        "",
        "| mode | clients | hotweights tok/s | transformers tok/s | ratio | hw TTFT p50/p99 s "
        "| tf TTFT p50/p99 s | hw ITL p99 ms | tf ITL p99 ms | hw / tf peak RSS MB | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peer = report.get("transformers_serve_cb", {})
    for key, row in report["hotweights"].items():
        if key == "reloads":
            continue
        other = peer.get(key, {})
        mode, clients = key.split("-")
        ratio = report.get("ratios", {}).get(key)
        lines.append(
            f"| {mode} | {clients} | {fmt(row['tokens_per_s'], digits=1)} "
            f"| {fmt(other.get('tokens_per_s'), digits=1)} | {fmt(ratio)}x "
            f"| {fmt(row['ttft_p50_s'])}/{fmt(row['ttft_p99_s'])} "
            f"| {fmt(other.get('ttft_p50_s'))}/{fmt(other.get('ttft_p99_s'))} "
            f"| {fmt(row['itl_p99_s'], 1000, 0)} | {fmt(other.get('itl_p99_s'), 1000, 0)} "
            f"| {fmt(row['peak_rss_mb'], digits=0)} / {fmt(other.get('peak_rss_mb'), digits=0)} "
            f"| {row['failed']} / {other.get('failed', '–')} |"
        )
    reloads = report["hotweights"].get("reloads")
    if reloads:
        lines += [
            "",
            f"During reloads (hotweights, {reloads['streams']} streams, {reloads['reloads']} "
            f"reloads): {reloads['requests']} requests, {reloads['failed']} failed, "
            f"{reloads['mixed_streams']} streams saw two generations; inter-token p99 "
            f"{fmt(reloads['itl_p99_steady_s'], 1000, 0)} ms steady, "
            f"{fmt(reloads['itl_p99_reload_s'], 1000, 0)} ms in reload windows "
            f"({fmt(reloads['itl_p99_ratio'])}x); windows {reloads['reload_window_s']} s.",
        ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
