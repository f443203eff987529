"""Time a bare warm load of one checkpoint with plain transformers, in one process: what a
user who restarts nothing would do by hand. Prints one JSON line.

    python bench/peers/bare_warm.py MODEL_DIR [--runs 3] [--device cuda]

One untimed round first (imports, the page cache, allocator pools), then `--runs` timed
rounds, each: `from_pretrained` of model and tokenizer (`load_s`), the validate-equivalent
(the tokenizer fits the embedding, one forward pass on a fixed prompt with every logit
finite: `validate_s`), one more forward pass with a KV cache (`forward_s`). The printed
figures are the medians of the timed rounds. On the CPU the weights stay the file's mapped
pages, as `from_pretrained` leaves them, and the validate pass is what first reads them; on
a GPU the load includes `.to(device)` and every timing ends with a synchronize.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from typing import Any

VALIDATION_PROMPT = "Hello, world. 1 2 3"
FORWARD_PROMPT = "Hello"


def one_round(source: str, device: str) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def now() -> float:
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter()

    t0 = now()
    tokenizer: Any = AutoTokenizer.from_pretrained(source)
    model: Any = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    model.eval()
    model.to(device)
    t1 = now()
    with torch.inference_mode():
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise SystemExit(f"{source}: the tokenizer is larger than the embedding")
        ids = torch.tensor([tokenizer.encode(VALIDATION_PROMPT)], device=device)
        logits = model(input_ids=ids, use_cache=False).logits
        if not bool(torch.isfinite(logits).all()):
            raise SystemExit(f"{source}: non-finite logits")
        t2 = now()
        forward = torch.tensor([tokenizer.encode(FORWARD_PROMPT)], device=device)
        model(input_ids=forward, use_cache=True)
        t3 = now()
    del model, tokenizer, logits
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()
    return {
        "load_s": t1 - t0,
        "validate_s": t2 - t1,
        "forward_s": t3 - t2,
        "total_s": t3 - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    one_round(args.source, args.device)  # untimed: imports, page cache, allocator
    rounds = [one_round(args.source, args.device) for _ in range(args.runs)]
    medians = {key: round(statistics.median(r[key] for r in rounds), 4) for key in rounds[0]}
    print(json.dumps({**medians, "runs": args.runs, "all_total_s": [r["total_s"] for r in rounds]}))


if __name__ == "__main__":
    main()
