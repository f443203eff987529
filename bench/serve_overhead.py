"""What the HTTP server costs a single stream: tokens/s through hotweights vs in-process.

The same small Qwen3-style model (built on the spot, random weights, about 7 M
parameters), the same prompt, greedy decoding, the same number of tokens; rounds
alternate between in-process generation (`LoadedLM.stream`) and a streamed chat
completion through a real uvicorn server and the official `openai` client.

    python bench/serve_overhead.py [--tokens 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from hotweights.backends import TransformersLoader
from hotweights.config import Config
from hotweights.demo.tinylm import TinyShape, save_tiny_model
from hotweights.generation import GenerationParams
from hotweights.server.assembly import build_state
from hotweights.testing import ServerThread

SHAPE = TinyShape(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=1024,
)
MESSAGES: Any = [{"role": "user", "content": "Tell me a story about hot reloads."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("bench/results/serve_overhead.json"))
    args = parser.parse_args()

    import openai

    with tempfile.TemporaryDirectory() as tmp:
        source = save_tiny_model(Path(tmp) / "model", seed=0, shape=SHAPE)
        loader = TransformersLoader()
        local = loader.load(str(source))
        params = GenerationParams(temperature=0.0, max_tokens=args.tokens)
        prompt = local.apply_chat_template(MESSAGES)

        def in_process() -> tuple[float, int]:
            started = time.perf_counter()
            tokens = 0
            for chunk in local.stream(prompt, params):
                tokens = chunk.completion_tokens
            return time.perf_counter() - started, tokens

        config = Config.load({"source": str(source), "model_name": "bench"}, environ={})
        with ServerThread(build_state(config, loader)) as server:
            server.wait_live()
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)

            def through_http() -> tuple[float, int]:
                started = time.perf_counter()
                tokens = 0
                stream = client.chat.completions.create(
                    model="bench",
                    messages=MESSAGES,
                    max_tokens=args.tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                for chunk in stream:
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                return time.perf_counter() - started, tokens

            in_process()
            through_http()  # warm both paths
            local_rates: list[float] = []
            http_rates: list[float] = []
            for _ in range(args.rounds):
                seconds, tokens = in_process()
                local_rates.append(tokens / seconds)
                seconds, tokens = through_http()
                http_rates.append(tokens / seconds)
            client.close()
        loader.unload(local)

    local_tps = statistics.median(local_rates)
    http_tps = statistics.median(http_rates)
    result = {
        "benchmark": "serve_overhead",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.machine(),
        "model": f"Qwen3-style {SHAPE}",
        "tokens_per_request": args.tokens,
        "rounds": args.rounds,
        "in_process_tokens_per_s": round(local_tps, 1),
        "server_tokens_per_s": round(http_tps, 1),
        "ratio": round(http_tps / local_tps, 3),
        "in_process_all": [round(r, 1) for r in local_rates],
        "server_all": [round(r, 1) for r in http_rates],
    }
    print("| path | tokens/s (median) |")
    print("|---|---|")
    print(f"| in-process LoadedLM.stream | {local_tps:.1f} |")
    print(f"| hotweights HTTP stream (openai client) | {http_tps:.1f} |")
    print(f"| ratio server / in-process | {http_tps / local_tps:.3f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
