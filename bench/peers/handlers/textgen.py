"""The generation call every peer runs: the benchmark model's tokenizer and weights from a
directory, greedy decoding of a fixed number of new tokens, as hotweights does.

Runs inside a peer's environment (torch, transformers); imports nothing from hotweights.
"""

from __future__ import annotations

import os
from typing import Any


class Generator:
    """One loaded version: its directory, its label, the model and tokenizer."""

    def __init__(self, path: str, version: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Servers start workers with differing thread settings (Ray: one); every system
        # computes with the benchmark's setting (`--torch-threads`), or one per core.
        torch.set_num_threads(
            int(os.environ.get("BENCH_TORCH_THREADS") or 0) or os.cpu_count() or 1
        )
        self.path = path
        self.version = version
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.train(False)
        self.model = model
        self.generate("Hello", 4)  # warm up, as hotweights does before a version goes live

    def generate(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        import torch

        ids = self.tokenizer(prompt, return_tensors="pt").input_ids  # (1, n)
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
            )  # (1, n + new)
        new = out[0, ids.shape[1] :]
        return {
            "text": self.tokenizer.decode(new, skip_special_tokens=True),
            "tokens": int(new.shape[0]),
            "version": self.version,
            "threads": torch.get_num_threads(),
        }


def parse(body: Any) -> tuple[str, int]:
    """(prompt, max_tokens) from a request body (dict, JSON text or bytes)."""
    import json

    if isinstance(body, bytes | bytearray):
        body = body.decode()
    if isinstance(body, str):
        body = json.loads(body)
    return str(body["prompt"]), int(body.get("max_tokens", 16))
