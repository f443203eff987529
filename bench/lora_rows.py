"""Many adapters in one batch: what the engine's per-row LoRA costs, beside PEFT's own way
of mixing adapters in a batch (`adapter_names`, one entry per row).

One model (issue #22's ~90 M-parameter CPU shape, float32, random weights) and 16 random
LoRA adapters of rank 16 on every attention and MLP projection (PEFT's layers, their B
matrices random so that they change the answers). 16 sequences of 64 greedy tokens are
generated together, their rows spread over 0 (the base alone), 1, 4 and 16 adapters:

- hotweights: one `BatchEngine` in-process, every sequence submitted at once, each with
  its adapter's updates (`backends/lora_layers.py`: tokens grouped per adapter);
- PEFT: the same weights as a `PeftModel` holding all 16 adapters, `generate` on the
  padded batch with `adapter_names` naming each row's adapter (`__base__` for none).

Each system is judged against its own base-only run (tokens/s with adapters / without):
what mixing adapters costs it. Issue #23 asks for at least 0.8x with 4 adapters and 0.6x
with 16 (through the server: `bench/lora.py`); here the same ratios for the mechanism,
beside PEFT's.

    python bench/lora_rows.py [--tokens 64] [--rank 16] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from peers.procs import wait_quiet  # noqa: E402
from peers.report import commit  # noqa: E402
from throughput import SHAPES  # noqa: E402

ROWS = 16
SPREADS = (0, 1, 4, 16)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = BENCH / "results"


def build(work: Path, rank: int) -> tuple[Path, Any]:
    """The base model on disk, and a PeftModel over it holding adapters a0..a15."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hotweights.demo.tinylm import save_tiny_model

    path = save_tiny_model(work / "base" / "1", seed=0, shape=SHAPES["90m"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config, adapter_name="a0")
        for index in range(1, ROWS):
            peft_model.add_adapter(f"a{index}", config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return path, peft_model.eval()


def adapter_pairs(peft_model: Any, adapter: str) -> dict[str, tuple[Any, Any, float]]:
    from peft.tuners.lora import LoraLayer

    pairs = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            layer: Any = module
            pairs[name.removeprefix("base_model.model.")] = (
                layer.lora_A[adapter].weight.detach(),
                layer.lora_B[adapter].weight.detach(),
                float(layer.scaling[adapter]),
            )
    return pairs


def prompts(lm: Any) -> Any:
    ids: list[list[int]] = [
        lm.prompt_ids(f"Request {i}: tell me about row {i}.") for i in range(ROWS)
    ]
    return ids


def run_hotweights(path: Path, peft_model: Any, tokens: int, repeat: int) -> dict[int, float]:
    from hotweights.backends import TransformersLoader
    from hotweights.backends.lora_layers import LoraWeights, install
    from hotweights.engine.batching import BatchEngine, EngineLimits
    from hotweights.generation import GenerationParams

    lm = TransformersLoader().load(str(path))
    like = next(lm.model.parameters())
    adapters = []
    for index in range(ROWS):
        pairs = adapter_pairs(peft_model, f"a{index}")
        install(lm.model, list(pairs))
        adapters.append(LoraWeights(f"a{index}", pairs, like=like))
    limits = EngineLimits(max_batch=ROWS, columns=256, max_batch_tokens=512, prefill_chunk=128,
                          prefix_blocks=0)  # fmt: skip
    engine = BatchEngine(lm, limits)
    ids = prompts(lm)
    ban = {token: -100.0 for token in lm.eos_ids}
    params = GenerationParams(temperature=0, max_tokens=tokens, logit_bias=ban)
    rates: dict[int, float] = {}
    try:
        for spread in (0, *SPREADS):  # the first run warms up
            seconds = []
            for _ in range(repeat):
                done = threading.Semaphore(0)

                def deliver(item: Any, done: threading.Semaphore = done) -> None:
                    if isinstance(item, BaseException) or item.finish_reason is not None:
                        done.release()

                began = time.perf_counter()
                for row in range(ROWS):
                    adapter = adapters[row % spread] if spread else None
                    engine.submit(ids[row], params, deliver, adapter=adapter)
                for _ in range(ROWS):
                    done.acquire()
                seconds.append(time.perf_counter() - began)
            rates[spread] = ROWS * tokens / statistics.median(seconds)
    finally:
        engine.stop()
        lm.release()
    return rates


def run_peft(path: Path, peft_model: Any, tokens: int, repeat: int) -> dict[int, float]:
    import torch

    from hotweights.backends import TransformersLoader

    lm = TransformersLoader().load(str(path))
    ids = prompts(lm)
    pad = 0
    longest = max(len(row) for row in ids)
    inputs = torch.tensor([[pad] * (longest - len(row)) + row for row in ids])  # left-padded
    mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in ids])
    lm.release()
    rates: dict[int, float] = {}
    for spread in (0, *SPREADS):
        names = [f"a{row % spread}" if spread else "__base__" for row in range(ROWS)]
        seconds = []
        for _ in range(repeat):
            began = time.perf_counter()
            with torch.inference_mode():
                peft_model.generate(
                    input_ids=inputs, attention_mask=mask, adapter_names=names,
                    max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                    pad_token_id=pad,
                )  # fmt: skip
            seconds.append(time.perf_counter() - began)
        rates[spread] = ROWS * tokens / statistics.median(seconds)
    return rates


def report(results: dict[str, dict[int, float]], args: argparse.Namespace) -> str:
    lines = [
        "# Many adapters in one batch: the engine's per-row LoRA beside PEFT's adapter_names",
        "",
        f"Commit {commit()}, `python bench/lora_rows.py --tokens {args.tokens} --rank "
        f"{args.rank} --repeat {args.repeat}`. {ROWS} sequences of {args.tokens} greedy tokens "
        f"together on the ~90 M-parameter model (float32, random weights); rank-{args.rank} "
        "adapters on every attention and MLP projection; rows spread round-robin over the "
        "adapters. Tokens/s (median of the repeats), and the ratio to the same system's "
        "base-only run.",
        "",
        "| adapters in the batch | hotweights tok/s | ratio | PEFT adapter_names tok/s | ratio |",
        "|---|---|---|---|---|",
    ]
    ours, peft = results["hotweights"], results["peft"]
    for spread in SPREADS:
        lines.append(
            f"| {spread or 'none (base)'} | {ours[spread]:.1f} | {ours[spread] / ours[0]:.2f}x | "
            f"{peft[spread]:.1f} | {peft[spread] / peft[0]:.2f}x |"
        )
    for spread, target in ((4, 0.8), (16, 0.6)):
        ratio = ours[spread] / ours[0]
        verdict = "MET" if ratio >= target else "MISSED"
        lines.append("")
        lines.append(
            f"- {spread} adapters: {ratio:.2f}x the base alone (target {target}x: {verdict})"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--quiet-wait", type=float, default=0.0)
    args = parser.parse_args()
    if args.quiet_wait:
        wait_quiet(args.quiet_wait)
    with tempfile.TemporaryDirectory() as work:
        path, peft_model = build(Path(work), args.rank)
        results = {
            "hotweights": run_hotweights(path, peft_model, args.tokens, args.repeat),
            "peft": run_peft(path, peft_model, args.tokens, args.repeat),
        }
    text = report(results, args)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora_rows.md").write_text(text)
    (RESULTS / "lora_rows.json").write_text(json.dumps({"commit": commit(), **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
