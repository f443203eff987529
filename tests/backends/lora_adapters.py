"""LoRA adapters for tests, made with PEFT on a tiny base: random B matrices (PEFT starts
them at zero, which changes nothing), saved as PEFT saves them, and PEFT's own greedy
answers to compare the server's with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def peft_adapter(base_dir: Path, seed: int, rank: int, targets: list[str]) -> Any:
    """A PEFT model over a fresh copy of the base, its LoRA B matrices random (PEFT starts
    them at zero, which would change nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return peft_model.eval()


def pairs_of(peft_model: Any) -> dict[str, tuple[Any, Any, float]]:
    """Module name in the base model -> (A, B, scale), read from PEFT's layers."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            layer: Any = module
            found[name.removeprefix("base_model.model.")] = (
                layer.lora_A["default"].weight.detach(),
                layer.lora_B["default"].weight.detach(),
                float(layer.scaling["default"]),
            )
    return found


def peft_greedy(model: Any, ids: list[int], tokens: int) -> tuple[list[int], list[float]]:
    """PEFT's own greedy continuation of `ids`: token ids and their log-probabilities."""
    import torch

    out: list[int] = []
    logprobs: list[float] = []
    with torch.inference_mode():
        for _ in range(tokens):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1].float()
            token = int(logits.argmax())
            out.append(token)
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
    return out, logprobs


def save_adapter(
    base_dir: Path, out: Path, seed: int, rank: int = 8, targets: list[str] | None = None
) -> Path:
    """A PEFT adapter on `base_dir` saved to `out` (safetensors); returns `out`."""
    peft_adapter(base_dir, seed, rank, targets or TARGETS).save_pretrained(
        out, save_embedding_layers=False
    )
    return out


def adapter_answer(
    base_dir: Path, adapter_dir: Path, prompt_ids: list[int], tokens: int
) -> list[int]:
    """PEFT's greedy continuation of `prompt_ids` on `base_dir` with the saved adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    return peft_greedy(model, prompt_ids, tokens)[0]
