"""Backends turn a source (a model directory) into a runnable model.

The Hugging Face transformers causal-LM backend: `TransformersLoader` loads a directory
as a `LoadedLM`, which streams text for `hotweights.generation.GenerationParams`.
Importing this package does not import torch or transformers; they are imported when a
model is first loaded.
"""

from __future__ import annotations

from hotweights.backends.decoding import IncrementalDecoder, StopMatcher
from hotweights.backends.devices import free_bytes, parse_device
from hotweights.backends.files import (
    ModelFiles,
    WeightFormat,
    estimate_bytes,
    fingerprint,
    inspect_model_dir,
)
from hotweights.backends.loaded_lm import LoadedLM, fallback_chat_prompt
from hotweights.backends.safetensors_header import SafetensorsHeader, TensorEntry, read_header
from hotweights.backends.sampling import sample_next_token
from hotweights.backends.transformers_lm import DTYPES, Device, Dtype, TransformersLoader

__all__ = [
    "DTYPES",
    "Device",
    "Dtype",
    "IncrementalDecoder",
    "LoadedLM",
    "ModelFiles",
    "SafetensorsHeader",
    "StopMatcher",
    "TensorEntry",
    "TransformersLoader",
    "WeightFormat",
    "estimate_bytes",
    "fallback_chat_prompt",
    "fingerprint",
    "free_bytes",
    "inspect_model_dir",
    "parse_device",
    "read_header",
    "sample_next_token",
]
