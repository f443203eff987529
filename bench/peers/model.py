"""The models the reload benchmarks serve: large enough that loading and page-in are real
work. `bench_shape(8)` is the default (25 M parameters, 97 MB of float32 safetensors); the
1.3 GB one is wide with few layers, so that one request stays affordable on two cores."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class BenchSize:
    """One model size `reload_under_load.py` runs at, with the load that suits it."""

    shape: TinyShape
    rate: float
    """Requests per second: about half of what one worker serving one request at a time
    (every peer) can answer at this size, so a reload has a core to itself."""
    duration: float
    """Seconds of load per system: five reloads, one every sixth of it, must all go live
    during the load even for the slowest mechanism (Ray Serve's rolling update: about
    16 s at 97 MB, 23 s at 1.3 GB on two cores), and leave enough requests for a p99."""


SIZES: dict[str, BenchSize] = {
    # 25.3 M parameters, 97 MB; one 8-token request costs about 0.15 s of one core.
    "97MB": BenchSize(bench_shape(8), rate=3.0, duration=120.0),
    # 330 M parameters, 1.32 GB; one 8-token request costs about 1.2 s of one core.
    "1.3GB": BenchSize(
        TinyShape(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=7,
            num_attention_heads=16,
            num_key_value_heads=8,
            max_position_embeddings=1024,
        ),
        rate=0.4,
        duration=180.0,
    ),
}
DEFAULT_SIZE = "97MB"
