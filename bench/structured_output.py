"""The cost of holding output to a JSON schema: throughput and grammar compile time.

Throughput: one hotweights server (batched engine, in this process, on the CPU) serves the
throughput benchmark's `90m` model (random weights, byte-level tokenizer; `--small` serves
the 0.1 M demo shape instead). `--streams` closed-loop clients (each sends its next
request when the last ended) run for `--seconds`, first unconstrained, then with a
`json_schema` `response_format`, then unconstrained again; sampled (temperature 1, a seed
per request), `--tokens` tokens at most. Reported: completion tokens/s of each run and the
constrained rate over the mean unconstrained one (target: at least 0.85x).

Compile time: `--schemas` JSON schemas compiled against the model's tokenizer by a fresh
grammar cache (cold), then asked for again (cached); with `--tokenizer DIR`, against that
tokenizer too (a real vocabulary: the byte-level one has 261 tokens).

    python bench/structured_output.py [--streams 16] [--seconds 60] [--tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from peers.report import commit  # noqa: E402
from throughput import build_model  # noqa: E402

CACHE = Path.home() / ".cache" / "hotweights" / "bench-structured"
TARGET = 0.85
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "mood": {"enum": ["calm", "busy", "tired"]},
    },
    "required": ["title", "rating", "tags", "mood"],
    "additionalProperties": False,
}


def schemas(count: int) -> list[dict[str, Any]]:
    """`count` different schemas of a realistic size (nested objects, arrays, enums)."""
    made = []
    for index in range(count):
        item = {
            "type": "object",
            "properties": {
                f"field_{index}": {"type": "string", "maxLength": 8 + index},
                "count": {"type": "integer", "minimum": 0, "maximum": 10 * (index + 1)},
                "kind": {"enum": [f"k{index}_{j}" for j in range(3 + index % 4)]},
            },
            "required": [f"field_{index}", "count", "kind"],
            "additionalProperties": False,
        }
        made.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 20},
                    "items": {"type": "array", "items": item, "maxItems": 2 + index % 3},
                    "ok": {"type": "boolean"},
                },
                "required": ["name", "items", "ok"],
                "additionalProperties": False,
            }
        )
    return made


async def closed_loop(
    url: str, streams: int, seconds: float, tokens: int, constrained: bool
) -> dict[str, Any]:
    """Completion tokens/s of `streams` clients sending requests back to back."""
    body: dict[str, Any] = {
        "model": "bench",
        "messages": [{"role": "user", "content": "Review the last film you saw."}],
        "max_tokens": tokens,
        "temperature": 1.0,
    }
    if constrained:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "review", "schema": SCHEMA},
        }
    deadline = time.perf_counter() + seconds
    counts = {"tokens": 0, "requests": 0, "failed": 0, "invalid": 0}

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        seed = index * 100_000
        while time.perf_counter() < deadline:
            seed += 1
            response = await client.post(url, json={**body, "seed": seed})
            if response.status_code != 200:
                counts["failed"] += 1
                continue
            data = response.json()
            counts["requests"] += 1
            counts["tokens"] += data["usage"]["completion_tokens"]
            choice = data["choices"][0]
            if constrained and choice["finish_reason"] == "stop":
                try:
                    json.loads(choice["message"]["content"])
                except ValueError:
                    counts["invalid"] += 1

    began = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(client_loop(client, i) for i in range(streams)))
    wall = time.perf_counter() - began
    return {**counts, "wall_s": wall, "tokens_per_s": counts["tokens"] / wall}


def throughput(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    from hotweights.backends import TransformersLoader
    from hotweights.config import Config
    from hotweights.engine.batching_loader import BatchingLoader, EngineSettings
    from hotweights.server.assembly import build_state
    from hotweights.testing import ServerThread

    options = {"source": str(model), "model_name": "bench", "model_roots": (str(model.parent),)}
    loader = BatchingLoader(TransformersLoader(), EngineSettings(max_batch=args.streams))
    server = ServerThread(build_state(Config.load(options, environ={}), loader)).start()
    try:
        server.wait_live()
        url = f"{server.url}/v1/chat/completions"
        asyncio.run(closed_loop(url, args.streams, min(10.0, args.seconds), 16, True))  # warm
        runs = {}
        for name, constrained in (("plain", False), ("json_schema", True), ("plain_2", False)):
            runs[name] = asyncio.run(
                closed_loop(url, args.streams, args.seconds, args.tokens, constrained)
            )
            print(name, json.dumps(runs[name]), flush=True)
    finally:
        server.stop()
    plain = statistics.mean([runs["plain"]["tokens_per_s"], runs["plain_2"]["tokens_per_s"]])
    return {"runs": runs, "ratio": runs["json_schema"]["tokens_per_s"] / plain}


def compile_times(tokenizer_dir: Path, count: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from hotweights.backends.grammar import GrammarCache
    from hotweights.generation import JsonOutput

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cache = GrammarCache()
    began = time.perf_counter()
    vocabulary = cache.tokenizer(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    prepared = time.perf_counter() - began
    constraints = [JsonOutput(json.dumps(schema)) for schema in schemas(count)]
    rows: dict[str, list[float]] = {"cold_ms": [], "cached_ms": []}
    for key in rows:
        for constraint in constraints:
            began = time.perf_counter()
            cache.matcher(vocabulary, constraint).allowed()  # compiled, copied, first mask
            rows[key].append((time.perf_counter() - began) * 1000)
    return {
        "tokenizer": str(tokenizer_dir),
        "vocabulary": len(tokenizer),
        "tokenizer_prepare_ms": prepared * 1000,
        **{f"{key}_total": sum(values) for key, values in rows.items()},
        **{f"{key}_median": statistics.median(values) for key, values in rows.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--schemas", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="the 0.1 M demo shape")
    parser.add_argument("--tokenizer", type=Path, help="also compile against this tokenizer")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "structured_output")
    args = parser.parse_args()
    if args.small:
        from hotweights.demo.tinylm import TinyShape, save_tiny_model

        model = CACHE / "small"
        if not (model / "model.safetensors").exists():
            save_tiny_model(model, seed=1, shape=TinyShape(max_position_embeddings=1024))
    else:
        model = build_model(CACHE / "bench", seed=1, size="90m")
    began = time.perf_counter()
    report: dict[str, Any] = {
        "commit": commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "args": {k: str(v) for k, v in vars(args).items()},
        "compile": [compile_times(model, args.schemas)],
    }
    if args.tokenizer is not None:
        report["compile"].append(compile_times(args.tokenizer, args.schemas))
    report["throughput"] = throughput(model, args)
    report["wall_s"] = time.perf_counter() - began
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    runs = report["throughput"]["runs"]
    ratio = report["throughput"]["ratio"]
    lines = [
        "# Structured output: throughput and compile time",
        "",
        f"{report['machine']}; `python bench/structured_output.py "
        f"{' '.join(f'--{k} {v}' for k, v in report['args'].items() if k != 'out')}`, "
        f"at {report['commit']}; wall {report['wall_s']:.0f} s.",
        "",
        "| run | requests | failed | invalid JSON | completion tokens/s |",
        "|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {run['requests']} | {run['failed']} | {run['invalid']} "
            f"| {run['tokens_per_s']:.1f} |"
        )
    verdict = "met" if ratio >= TARGET else "**missed**"
    lines += ["", f"json_schema over unconstrained: **{ratio:.2f}x** (target {TARGET}x: {verdict})"]
    lines += ["", "| tokenizer | vocabulary | prepare ms | 10 cold ms (median) | cached ms |"]
    lines += ["|---|---|---|---|---|"]
    for row in report["compile"]:
        lines.append(
            f"| {Path(row['tokenizer']).name} | {row['vocabulary']} "
            f"| {row['tokenizer_prepare_ms']:.0f} | {row['cold_ms_total']:.1f} "
            f"({row['cold_ms_median']:.2f}) | {row['cached_ms_total']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
