"""Tiny Qwen3-style causal language models built on the spot.

The demo, the tests and the benchmarks need real transformers checkpoints without a model
hub. A byte-level tokenizer (256 byte tokens, the chat special tokens and the tool-call tags)
and a small
Qwen3 configuration save to a Hugging Face directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a chat template) in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_TOKENS = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
"""Added tokens, not special: a decoded answer keeps them, so its calls can be parsed."""

# ChatML, the format Qwen models use, with Hermes-style tools: the tools' signatures in a
# system turn, each call as `<tool_call>` JSON `</tool_call>`, each result in a `tool` turn.
# Without tools it renders exactly as plain ChatML. `add_generation_prompt` opens the
# assistant turn.
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ 'Functions you may call, one signature a line:\n<tools>\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}"
    "{{ '</tools>\nTo call one, answer <tool_call>\n' }}"
    '{{ \'{"name": <name>, "arguments": <object>}\n</tool_call><|im_end|>\n\' }}'
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% if message['content'] %}{{ message['content'] + '\n' }}{% endif %}"
    "{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>\n{\"name\": ' + (call['function']['name'] | tojson) }}"
    "{{ ', \"arguments\": ' + (call['function']['arguments'] | tojson) + '}\n</tool_call>' }}"
    "{% if not loop.last %}{{ '\n' }}{% endif %}"
    "{% endfor %}{{ '<|im_end|>\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>tool\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{{ '<|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyShape:
    """The size of a tiny model; the defaults give about 0.1 M parameters."""

    hidden_size: int = 64
    """Width of the residual stream."""
    intermediate_size: int = 128
    """Width of each MLP."""
    num_hidden_layers: int = 2
    """Number of decoder layers."""
    num_attention_heads: int = 4
    """Query heads per layer."""
    num_key_value_heads: int = 2
    """Key/value heads per layer (grouped-query attention)."""
    max_position_embeddings: int = 512
    """Longest sequence the rotary embedding is configured for."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the output head. A random tied model keeps repeating
    the last prompt token whatever its seed; an untied one answers each prompt its own way
    (what a test of attention or of two versions needs)."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: every byte is a token, no merges, plus the chat specials and
    the tool-call tags."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(byte_alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    # The class's __init__ is unannotated; calling it through a typed alias keeps mypy strict.
    make_tokenizer: Callable[..., PreTrainedTokenizerFast] = PreTrainedTokenizerFast
    tokenizer = make_tokenizer(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START],
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START]})
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TOOL_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of the single token `token` in `tokenizer`'s vocabulary."""
    found = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(found, int):
        raise TypeError(f"{token!r} is not a single token of this tokenizer")
    return found


def build_model(
    tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, shape: TinyShape | None = None
) -> PreTrainedModel:
    """A randomly initialised Qwen3 causal LM sized to `tokenizer`, seeded for repeatability."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape = shape or TinyShape()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.hidden_size // shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=token_id(tokenizer, IM_END),
        pad_token_id=token_id(tokenizer, END_OF_TEXT),
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def save_tiny_model(path: Path, *, seed: int = 0, shape: TinyShape | None = None) -> Path:
    """Build an untrained tiny model and save it, with its tokenizer, as safetensors in `path`."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed, shape=shape)
    return save_pretrained(path, model, tokenizer)


def save_pretrained(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> Path:
    """Write `model` (safetensors) and `tokenizer` into `path`, creating it."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
