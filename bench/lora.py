"""LoRA adapters: throughput over many adapters, an adapter's load to live, reloads under
traffic (issue #23's benchmark).

One `hotweights serve --repo ROOT` subprocess (CPU, float32, `--threads`) serves issue
#22's ~90 M-parameter model (bench/throughput.py's `90m`: random weights, the byte-level
tokenizer) as `bench`, and 16 adapters `a00`..`a15` on it: rank 16, alpha 32, on every
attention and MLP projection, A and B both random (seeded normal, std 0.05: B is not the
zero PEFT starts from, so every adapter changes every answer), saved by PEFT's
`save_pretrained`. Built on the spot and cached in ~/.cache/hotweights/lora-bench.

1. **Throughput**: 16 closed-loop streamed clients, exactly `--tokens` greedy tokens a
   request (the end tokens banned through `logit_bias`); client i asks the base alone, or
   adapter `a{i mod k}` for k = 1, 4, 16; the levels in turn, `--rounds` times. Tokens/s,
   and against the base alone. Targets: at least 0.8x with 4 adapters, 0.6x with 16.
2. **Going live**: `POST /v1/load_lora_adapter` (no gate) of a new name, from the call to
   its answer (the adapter live), median of `--live-runs`, each unloaded after; against
   PEFT in this process on a warm model (the base loaded and one adapter applied first):
   `load_adapter` of the same directory, `set_adapter` and one forward pass of a
   templated prompt, median of as many runs. Target: at most 1.5x.
3. **Reloads under traffic**: 16 streams (half on adapter `hot`, a quarter each on the
   base and `a00`), one prompt per model, while `hot` is loaded `--reloads` times through
   `/v1/load_lora_adapter`, alternating the weights of `a01` and `a02`. Failed requests;
   mixed: a request whose chunks named two (base, adapter) generation pairs, or whose
   answer differs from the most common answer of its model and weight set. Targets: 0, 0.

Writes bench/results/lora.{json,md}, naming the commit and the command.

    python bench/lora.py [--tokens 64] [--requests 48] [--reloads 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from peers.chat_load import PROMPTS, _streamed, body, prompt_for, summarize  # noqa: E402
from peers.procs import free_port, spawn, stop_group, wait_http, wait_quiet  # noqa: E402
from peers.report import commit  # noqa: E402
from throughput import MODEL, SHAPES  # noqa: E402

CACHE = Path.home() / ".cache" / "hotweights" / "lora-bench"
BASE = "bench"
ADAPTERS = [f"a{i:02d}" for i in range(16)]
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, STD = 16, 32, 0.05
SEED = 1
RECIPE = {"shape": "90m", "seed": SEED, "rank": RANK, "alpha": ALPHA, "std": STD, "adapters": 16}
LEVELS = (0, 1, 4, 16)
TARGETS = {"throughput_4": 0.8, "throughput_16": 0.6, "live_ratio": 1.5}


def build_repository(root: Path) -> Path:
    """ROOT/bench/1 (the base) and ROOT/aNN/1 (the adapters), published; cached by recipe."""
    stamp = root / "recipe.json"
    repo = root / "repo"
    if stamp.is_file() and json.loads(stamp.read_text()) == RECIPE:
        return repo
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hotweights.demo.tinylm import save_tiny_model
    from hotweights.sources import publish

    shutil.rmtree(root, ignore_errors=True)
    base = save_tiny_model(root / "base", seed=SEED, shape=SHAPES["90m"])
    publish(base, repo, BASE, mode="move")
    model = AutoModelForCausalLM.from_pretrained(repo / BASE / "1", use_safetensors=True)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGET_MODULES)
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = BASE
    for index, name in enumerate(ADAPTERS):
        generator = torch.Generator().manual_seed(100 + index)
        with torch.no_grad():
            for key, parameter in peft_model.named_parameters():
                if "lora_A" in key or "lora_B" in key:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * STD)
        directory = root / "adapters" / name
        peft_model.save_pretrained(str(directory), save_embedding_layers=False)
        (directory / "README.md").unlink(missing_ok=True)
        publish(directory, repo, name, mode="move")
        print(f"built adapter {name}", flush=True)
    stamp.write_text(json.dumps(RECIPE))
    return repo


def serve(repo: Path, args: argparse.Namespace, log: Path) -> tuple[str, Any]:
    port = free_port()
    command: list[str | Path] = [
        sys.executable, "-m", "hotweights.cli", "serve", "--repo", repo, "--port", str(port),
        "--max-batch-size", "16", "--max-pending", "256", "--device", "cpu",
        "--dtype", "float32", "--threads", str(args.threads),
    ]  # fmt: skip
    process = spawn(command, log)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/ready", timeout=600, process=process, log=log)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        listed = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
        if {e["id"] for e in listed if e.get("generation")} >= {BASE, *ADAPTERS}:
            return url, process
        time.sleep(0.5)
    raise TimeoutError("the adapters did not go live within 600 s")


def throughput(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """16 streamed closed-loop clients over the base alone, then 1, 4 and 16 adapters."""

    async def level(models: list[str]) -> tuple[list[Any], float]:
        limits = httpx.Limits(max_connections=20)
        per_client = max(2, args.requests // 16)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:

            async def loop(i: int) -> list[Any]:
                model = models[i % len(models)]
                return [
                    await _streamed(
                        client, chat, request(model, prompt_for(i, k)), time.perf_counter()
                    )
                    for k in range(per_client)
                ]

            began = time.perf_counter()
            groups = await asyncio.gather(*(loop(i) for i in range(16)))
            return [r for g in groups for r in g], time.perf_counter() - began

    chat = f"{url}/v1/chat/completions"
    no_end = {str(token): -100 for token in end_tokens(CACHE / "repo" / BASE / "1")}

    def request(model: str, prompt: str) -> dict[str, Any]:
        """Streamed, greedy, every request exactly `--tokens` long: the end tokens banned."""
        return body(model, prompt, args.tokens, True) | {"logit_bias": no_end}

    asyncio.run(level([BASE, *ADAPTERS]))  # warm every adapter's path once
    rounds: dict[str, list[dict[str, Any]]] = {str(count): [] for count in LEVELS}
    for round_ in range(args.rounds):  # interleaved: other work on the machine hits all alike
        for count in LEVELS:
            quiet = wait_quiet(args.quiet_wait)
            results, wall = asyncio.run(level(ADAPTERS[:count] or [BASE]))
            row = summarize(results, wall) | {"busy_cores_before": quiet["busy_cores"]}
            rounds[str(count)].append(row)
            tokens_per_s, failed = row["tokens_per_s"], row["failed"]
            print(f"throughput, round {round_ + 1}, {count:2d} adapters: "
                  f"{tokens_per_s:.1f} tok/s, failed {failed}", flush=True)  # fmt: skip
    rows: dict[str, Any] = {}
    for key, measured in rounds.items():
        ratios = [
            m["tokens_per_s"] / base["tokens_per_s"]
            for m, base in zip(measured, rounds["0"], strict=True)
        ]
        rows[key] = {
            "tokens_per_s": round(statistics.median(m["tokens_per_s"] for m in measured), 1),
            "vs_base": round(statistics.median(ratios), 3),
            "rounds_tokens_per_s": [round(m["tokens_per_s"], 1) for m in measured],
            "rounds_vs_base": [round(r, 3) for r in ratios],
            "failed": sum(m["failed"] for m in measured),
            "requests": sum(m["requests"] for m in measured),
            "tokens_per_request": round(
                statistics.median(m["tokens_per_request"] or 0.0 for m in measured), 1
            ),
            "ttft_p50_s": statistics.median(m["ttft_p50_s"] or 0.0 for m in measured),
            "gap_p99_s": statistics.median(m["gap_p99_s"] or 0.0 for m in measured),
            "busy_cores_before": [m["busy_cores_before"] for m in measured],
            "rounds": measured,
        }
    return rows


def end_tokens(model_dir: Path) -> list[int]:
    """The ids that end an answer (`<|im_end|>`, `<|endoftext|>`) in `model_dir`'s tokenizer."""
    from transformers import AutoTokenizer

    from hotweights.demo.tinylm import END_OF_TEXT, IM_END, token_id

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return sorted({token_id(tokenizer, IM_END), token_id(tokenizer, END_OF_TEXT)})


def going_live_hotweights(url: str, runs: int) -> dict[str, Any]:
    seconds, phases = [], []
    for k in range(runs):
        path = CACHE / "repo" / ADAPTERS[3 + k % 12] / "1"
        began = time.perf_counter()
        answer = httpx.post(
            f"{url}/v1/load_lora_adapter",
            json={"lora_name": f"live{k}", "lora_path": str(path)},
            timeout=600,
        )
        seconds.append(time.perf_counter() - began)
        if answer.status_code != 200:
            raise RuntimeError(f"load_lora_adapter answered {answer.status_code}: {answer.text}")
        phases.append(answer.json().get("phases", {}))
        httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": f"live{k}"}, timeout=60)
        time.sleep(1.0)  # the unloaded adapter's release, off the next run's clock
    return {
        "runs_s": [round(s, 4) for s in seconds],
        "median_s": round(statistics.median(seconds), 4),
        "phases_median_s": {
            name: round(statistics.median(p.get(name, 0.0) for p in phases), 4)
            for name in phases[0]
        },
    }


def going_live_peft(repo: Path, runs: int, threads: int) -> dict[str, Any]:
    """PEFT in this process: the base warm, one adapter applied, then per run
    `load_adapter` + `set_adapter` + one forward pass."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(repo / BASE / "1")
    model = AutoModelForCausalLM.from_pretrained(repo / BASE / "1", use_safetensors=True)
    model.train(False)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    peft_model = PeftModel.from_pretrained(model, repo / ADAPTERS[0] / "1", adapter_name="warm")
    with torch.inference_mode():
        peft_model(input_ids=ids)
    seconds = []
    for k in range(runs):
        began = time.perf_counter()
        peft_model.load_adapter(repo / ADAPTERS[3 + k % 12] / "1", adapter_name=f"live{k}")
        peft_model.set_adapter(f"live{k}")
        with torch.inference_mode():
            peft_model(input_ids=ids)
        seconds.append(time.perf_counter() - began)
        peft_model.set_adapter("warm")
        peft_model.delete_adapter(f"live{k}")
    return {
        "runs_s": [round(s, 4) for s in seconds],
        "median_s": round(statistics.median(seconds), 4),
    }


async def _ask(client: httpx.AsyncClient, url: str, model: str, tokens: int) -> dict[str, Any]:
    """One streamed greedy request: ok, its text and the (base, adapter) pairs it saw."""
    request = {"model": model, "messages": [{"role": "user", "content": PROMPTS[1]}],
               "max_tokens": tokens, "temperature": 0, "stream": True}  # fmt: skip
    seen: set[str] = set()
    parts: list[str] = []
    try:
        async with client.stream("POST", url, json=request) as response:
            ok = response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                ok = ok and "error" not in chunk
                seen.add("-".join((chunk.get("system_fingerprint") or "").split("-")[:-1]))
                for choice in chunk.get("choices") or []:
                    parts.append((choice.get("delta") or {}).get("content") or "")
    except httpx.HTTPError as exc:
        return {"model": model, "ok": False, "error": repr(exc), "pairs": [], "text": ""}
    return {"model": model, "ok": ok, "pairs": sorted(seen), "text": "".join(parts)}


def reloads_under_traffic(url: str, reloads: int, tokens: int) -> dict[str, Any]:
    sources = [CACHE / "repo" / name / "1" for name in (ADAPTERS[1], ADAPTERS[2])]
    load = f"{url}/v1/load_lora_adapter"
    first = httpx.post(load, json={"lora_name": "hot", "lora_path": str(sources[0])}, timeout=600)
    weights_of = {first.json()["new_generation"]: 0}
    events: list[dict[str, Any]] = []

    async def drive() -> list[dict[str, Any]]:
        stop = asyncio.Event()
        done: list[dict[str, Any]] = []
        models = ["hot"] * 8 + [BASE] * 4 + [ADAPTERS[0]] * 4
        async with httpx.AsyncClient(timeout=600) as client:

            async def stream(model: str) -> None:
                while not stop.is_set():
                    done.append(await _ask(client, f"{url}/v1/chat/completions", model, tokens))

            async def reload_all() -> None:
                await asyncio.sleep(3.0)
                for i in range(reloads):
                    which = (i + 1) % 2
                    began = time.perf_counter()
                    answer = await client.post(
                        load, json={"lora_name": "hot", "lora_path": str(sources[which])}
                    )
                    event = answer.json()
                    events.append({"status": answer.status_code,
                                   "seconds": round(time.perf_counter() - began, 3)})  # fmt: skip
                    if answer.status_code == 200:
                        weights_of[event["new_generation"]] = which
                    await asyncio.sleep(0.5)
                await asyncio.sleep(2.0)
                stop.set()

            await asyncio.gather(reload_all(), *(stream(m) for m in models))
        return done

    done = asyncio.run(drive())
    groups: dict[tuple[str, int | None], Counter[str]] = {}
    keyed = []
    for r in done:
        if not r["ok"] or len(r["pairs"]) != 1:
            continue
        pair = r["pairs"][0]  # hw-g1 or hw-g1-a3
        adapter = int(pair.split("-a")[1]) if "-a" in pair else None
        key = (r["model"], weights_of.get(adapter, -1) if r["model"] == "hot" else None)
        groups.setdefault(key, Counter())[r["text"]] += 1
        keyed.append((key, r["text"]))
    wrong = sum(text != groups[key].most_common(1)[0][0] for key, text in keyed)
    return {
        "reloads": len(events),
        "reloads_ok": sum(e["status"] == 200 for e in events),
        "reload_s_median": statistics.median(e["seconds"] for e in events) if events else None,
        "requests": len(done),
        "failed": sum(not r["ok"] for r in done),
        "two_versions": sum(len(r["pairs"]) > 1 for r in done if r["ok"]),
        "wrong_answers": wrong,
        "answers_checked": len(keyed),
        "hot_by_weights": {str(k[1]): sum(c.values()) for k, c in groups.items() if k[0] == "hot"},
        "mixed": sum(len(r["pairs"]) > 1 for r in done if r["ok"]) + wrong,
        "errors": sorted({r.get("error", "") for r in done if not r["ok"]})[:3],
    }


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows, live, reloads = report["throughput"], report["live"], report["reloads"]
    checks = [
        ("tokens/s with 4 adapters / base alone", rows["4"]["vs_base"],
         TARGETS["throughput_4"], ">="),
        ("tokens/s with 16 adapters / base alone", rows["16"]["vs_base"],
         TARGETS["throughput_16"], ">="),
        ("load_lora_adapter to live / PEFT load_adapter + forward", live["ratio"],
         TARGETS["live_ratio"], "<="),
        ("failed requests across the reloads", reloads["failed"], 0, "<="),
        ("mixed requests across the reloads", reloads["mixed"], 0, "<="),
    ]  # fmt: skip
    return [
        {"target": name, "value": value, "limit": limit, "sense": sense,
         "met": None if value is None else (value >= limit if sense == ">=" else value <= limit)}
        for name, value, limit, sense in checks
    ]  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    rows, live, reloads = report["throughput"], report["live"], report["reloads"]
    lines = [
        "# LoRA adapters: throughput, going live, reloads under traffic",
        "",
        f"Measured at {report['commit']} on {report['date']}; {report['machine']['cpus']} CPUs. "
        f"{report['model']}. Produced by `{report['command']}`.",
        "",
        f"## Throughput: 16 streamed clients, {report['tokens']} greedy tokens a request, "
        f"{report['rounds']} rounds of the levels in turn",
        "",
        "| adapters | tok/s (median) | vs base alone (median of the rounds' ratios) | "
        "tok/s per round | ratio per round | tokens/request | TTFT p50 s | gap p99 ms | failed "
        "| busy before |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for count, row in rows.items():
        lines.append(
            f"| {count if count != '0' else 'none (base)'} | {row['tokens_per_s']} | "
            f"{row['vs_base']} | {row['rounds_tokens_per_s']} | {row['rounds_vs_base']} | "
            f"{row['tokens_per_request']} | "
            f"{row['ttft_p50_s']:.2f} | {round(row['gap_p99_s'] * 1000)} | "
            f"{row['failed']} / {row['requests']} | {row['busy_cores_before']} |"
        )
    hw, peft = live["hotweights"], live["peft"]
    phases = ", ".join(f"{k} {v}" for k, v in hw["phases_median_s"].items())
    lines += [
        "",
        "## Going live (no gate)",
        "",
        "| | median s | runs s |",
        "|---|---|---|",
        f"| `POST /v1/load_lora_adapter` to its answer (server phases: {phases}) | "
        f"{hw['median_s']} | {hw['runs_s']} |",
        f"| PEFT in-process: `load_adapter` + `set_adapter` + one forward pass | "
        f"{peft['median_s']} | {peft['runs_s']} |",
        f"| ratio | {live['ratio']} | |",
        "",
        f"## {reloads['reloads']} reloads of adapter `hot` under 16 streams",
        "",
        f"Reloads answered 200: {reloads['reloads_ok']} of {reloads['reloads']}, median "
        f"{reloads['reload_s_median']} s each. Requests: {reloads['requests']}; failed: "
        f"{reloads['failed']}; saw two versions: {reloads['two_versions']}; answer differing "
        f"from its model and weight set's: {reloads['wrong_answers']} of "
        f"{reloads['answers_checked']} checked (`hot`'s requests per weight set, -1 for a "
        f"generation no load answered with: {reloads['hot_by_weights']}).",
        "",
        "## Targets (issue #23)",
        "",
        "| target | value | limit | met |",
        "|---|---|---|---|",
    ]
    for check in report["targets"]:
        met = {True: "MET", False: "**MISSED**", None: "n/a"}[check["met"]]
        limit = f"{check['sense']} {check['limit']}"
        lines.append(f"| {check['target']} | {check['value']} | {limit} | {met} |")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens a request")
    parser.add_argument("--requests", type=int, default=48, help="per throughput level")
    parser.add_argument("--rounds", type=int, default=3, help="of the throughput levels")
    parser.add_argument("--live-runs", type=int, default=5)
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--reload-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quiet-wait", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "lora.json")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the server stops
    repo = build_repository(CACHE)
    report: dict[str, Any] = {
        "commit": commit(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/lora.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count()},
        "model": f"{MODEL}; served as float32 on cpu, --threads {args.threads}; 16 adapters "
        f"of rank {RANK} (alpha {ALPHA}) on {', '.join(TARGET_MODULES)}, random A and B",
        "tokens": args.tokens,
        "rounds": args.rounds,
    }
    wait_quiet(args.quiet_wait)
    peft = going_live_peft(repo, args.live_runs, args.threads)
    print(f"going live, PEFT: {peft}", flush=True)
    url, process = serve(repo, args, CACHE / "server.log")
    try:
        report["throughput"] = throughput(url, args)
        wait_quiet(args.quiet_wait)
        hw = going_live_hotweights(url, args.live_runs)
        print(f"going live, hotweights: {hw}", flush=True)
        ratio = round(hw["median_s"] / peft["median_s"], 3)
        report["live"] = {"hotweights": hw, "peft": peft, "ratio": ratio}
        report["reloads"] = reloads_under_traffic(url, args.reloads, args.reload_tokens)
        print(f"reloads: {report['reloads']}", flush=True)
    finally:
        stop_group(process)
    report["targets"] = targets(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
