"""Closed-loop chat clients for the throughput benchmark, and what they saw.

Each client sends its next greedy chat completion (`/v1/chat/completions`) as soon as the
last one ended. A streamed request records its time to first token (TTFT: when the first
chunk with content arrived) and the gap between each two content chunks; every request
records its completion tokens (from `usage`; a chunk can hold several tokens, e.g. the
bytes of one character) and the generations the server stamped on it (hotweights names
its generation in a header and in `system_fingerprint`; other servers name none).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

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
GEN_HEADER = "x-hotweights-generation"


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
    """When each content chunk arrived (perf_counter)."""
    error: str | None = None
    """Why it failed, shortened: the status and body, the error chunk, or the exception."""


def prompt_for(client: int, k: int) -> str:
    """The `k`th prompt of client `client`: every client's differ, so no server can answer
    one from another's prefix cache beyond the chat template's header."""
    return PROMPTS[(client + k) % len(PROMPTS)] + f" (client {client})"


def body(model: str, prompt: str, tokens: int, stream: bool) -> dict[str, Any]:
    request: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        request["stream_options"] = {"include_usage": True}
    return request


async def one(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int, stream: bool
) -> Result:
    began = time.perf_counter()
    try:
        if not stream:
            response = await client.post(url, json=body(model, prompt, tokens, False))
            data = response.json()
            ok = response.status_code == 200 and "choices" in data
            count = data.get("usage", {}).get("completion_tokens", 0) if ok else 0
            result = Result(ok, count, time.perf_counter() - began, started=began)
            if not ok:
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
            if GEN_HEADER in response.headers:
                result.generations.add(response.headers[GEN_HEADER])
            return result
        return await _streamed(client, url, body(model, prompt, tokens, True), began)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        failed = Result(False, 0, time.perf_counter() - began, started=began)
        failed.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        return failed


async def _streamed(
    client: httpx.AsyncClient, url: str, request: dict[str, Any], began: float
) -> Result:
    result = Result(True, 0, 0.0, started=began)
    last = began
    usage_tokens: int | None = None
    async with client.stream("POST", url, json=request) as response:
        result.ok = response.status_code == 200
        if not result.ok:
            result.error = f"HTTP {response.status_code}"
        if GEN_HEADER in response.headers:
            result.generations.add(response.headers[GEN_HEADER])
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result.ok = False
                result.error = f"error chunk: {str(chunk['error'])[:200]}"
                continue
            if chunk.get("usage"):
                usage_tokens = chunk["usage"].get("completion_tokens")
            fingerprint = chunk.get("system_fingerprint") or ""
            if fingerprint.startswith("hw-g"):  # hw-g3-1a2b3c4d names generation 3
                result.generations.add(fingerprint.split("-")[1][1:])
            for choice in chunk.get("choices") or []:
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


async def closed_loop(
    base: str, model: str, concurrency: int, per_client: int, tokens: int, stream: bool
) -> tuple[list[Result], float]:
    """`concurrency` clients, `per_client` requests each; the results and the wall time."""
    url = f"{base}/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def client_loop(index: int) -> list[Result]:
            done = []
            for k in range(per_client):
                done.append(await one(client, url, model, prompt_for(index, k), tokens, stream))
            return done

        began = time.perf_counter()
        groups = await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
        return [r for group in groups for r in group], time.perf_counter() - began


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile `q` (0-1) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(results: list[Result], wall: float) -> dict[str, Any]:
    """The figures the report keeps for one system at one concurrency and mode."""
    firsts = [r.first for r in results if r.first is not None]
    gaps = [gap for r in results for gap in r.gaps]
    tokens = sum(r.tokens for r in results)
    done = [r for r in results if r.ok]
    return {
        "requests": len(results),
        "failed": len(results) - len(done),
        "tokens": tokens,
        "tokens_per_request": tokens / len(done) if done else None,
        "tokens_per_s": tokens / wall,
        "wall_s": wall,
        "latency_p50_s": pct([r.latency for r in results], 0.5),
        "ttft_p50_s": pct(firsts, 0.5),
        "ttft_p99_s": pct(firsts, 0.99),
        "gap_p50_s": pct(gaps, 0.5),
        "gap_p99_s": pct(gaps, 0.99),
        "errors": sorted({r.error for r in results if r.error})[:3],
    }


def streams_across_reloads(
    base: str, models: list[Path], streams: int, reloads: int, steady: float, tokens: int
) -> dict[str, Any]:
    """`streams` closed-loop streams against hotweights (model `bench`); after `steady`
    seconds, `reloads` reloads (`POST /admin/reload`) alternating `models`, `steady` / 2
    apart. A gap is in a reload window when its chunk arrived between a reload's request
    and its answer."""
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
                    results.append(await one(client, url, "bench", prompt, tokens, True))
                    k += 1

            async def reload_all() -> None:
                await asyncio.sleep(steady)
                for i in range(reloads):
                    target = models[(i + 1) % len(models)]
                    began = time.perf_counter()
                    answer = await client.post(
                        f"{base}/admin/reload", json={"path": str(target), "wait": True}
                    )
                    windows.append((began, time.perf_counter()))
                    if answer.status_code != 200:
                        print("reload failed:", answer.text[:300], flush=True)
                    await asyncio.sleep(steady / 2)
                stop.set()

            began = time.perf_counter()
            await asyncio.gather(reload_all(), *(streamer(i) for i in range(streams)))
            return results, time.perf_counter() - began

    results, wall = asyncio.run(drive())
    steady_gaps: list[float] = []
    window_gaps: list[float] = []
    for r in results:
        for stamp, gap in zip(r.stamps[1:], r.gaps, strict=True):
            reloading = any(start <= stamp <= end for start, end in windows)
            (window_gaps if reloading else steady_gaps).append(gap)
    calm, during = pct(steady_gaps, 0.99), pct(window_gaps, 0.99)
    return {
        "streams": streams,
        "reloads": len(windows),
        "requests": len(results),
        "failed": sum(not r.ok for r in results),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "mixed_streams": sum(len(r.generations) > 1 for r in results),
        "generations_seen": sorted({g for r in results for g in r.generations}),
        "gap_p99_steady_s": calm,
        "gap_p99_reload_s": during,
        "gap_p99_ratio": (during / calm) if calm and during else None,
        "reload_window_s": [round(end - start, 3) for start, end in windows],
        "tokens_per_s": sum(r.tokens for r in results) / wall,
    }
