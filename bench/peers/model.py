"""The model the reload benchmarks serve: large enough that loading and page-in are real
work (8 layers: 25 M parameters, 97 MB of float32 safetensors)."""

from __future__ import annotations

from hotweights.demo.tinylm import TinyShape


def bench_shape(layers: int = 8) -> TinyShape:
    """A Qwen3-style shape: hidden 512, intermediate 1536, 8 heads, 4 KV heads."""
    return TinyShape(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
