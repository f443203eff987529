"""Teach a tiny causal LM a handful of chat answers by heart, and ask it questions.

The demo needs models whose answers are known exactly, so that a swap from one version to
the next is visible in every response. Memorising a few short ChatML conversations is a
matter of about a hundred optimiser steps on a model of 0.1 M parameters: a second or two
on a two-core CPU. Training stops only when greedy decoding reproduces every answer followed
by the eos token, and raises `DemoBuildError` when that has not happened within the step cap.

Everything here runs in the calling thread and is not thread-safe: one training or one
question at a time per model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hotweights.demo.tinylm import IM_END, token_id
from hotweights.errors import HotweightsError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label value that the loss skips (the prompt and the padding)."""


class DemoBuildError(HotweightsError):
    """A demo model did not learn its answers within the step cap, or could not be saved."""


@dataclass(frozen=True)
class ModelReply:
    """What greedy decoding produced for one question."""

    text: str
    """The decoded answer, without the eos token."""
    finished: bool
    """True when the model ended its answer with the eos token within the token budget."""


@dataclass(frozen=True)
class TrainingPlan:
    """How hard to try before giving up."""

    learning_rate: float = 1e-2
    """AdamW learning rate; high, because the goal is memorisation, not generalisation."""
    max_steps: int = 600
    """Optimiser steps after which training gives up with `DemoBuildError`."""
    confidence: float = 0.95
    """Probability every answer token must reach (teacher-forced) before decoding is checked."""


def chat_messages(question: str, system: str | None = None) -> list[dict[str, str]]:
    """The messages of a one-turn chat asking `question`, with an optional system prompt."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": question})
    return messages


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    system: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Token ids of the chat-templated prompt (offering `tools`, when given), ending with
    the opened assistant turn."""
    text = tokenizer.apply_chat_template(
        chat_messages(question, system),
        tools=[dict(tool) for tool in tools] if tools else None,
        add_generation_prompt=True,
        tokenize=False,
    )
    if not isinstance(text, str):
        raise TypeError(f"the chat template rendered {type(text).__name__}, expected str")
    return _encode(tokenizer, text)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text`, special tokens written in it included, nothing added."""
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def _encode_batch(
    tokenizer: PreTrainedTokenizerBase,
    answers: Mapping[str, str],
    systems: Sequence[str | None],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels), each [conversations, longest]."""
    import torch

    rows: list[tuple[list[int], list[int]]] = []
    for system in systems:
        for question, answer in answers.items():
            prompt = prompt_ids(tokenizer, question, system, tools)
            target = _encode(tokenizer, answer + IM_END)
            rows.append((prompt + target, [IGNORE_INDEX] * len(prompt) + target))
    longest = max(len(ids) for ids, _ in rows)
    pad_id: int = tokenizer.pad_token_id
    input_ids = [ids + [pad_id] * (longest - len(ids)) for ids, _ in rows]
    mask = [[1] * len(ids) + [0] * (longest - len(ids)) for ids, _ in rows]
    labels = [lab + [IGNORE_INDEX] * (longest - len(lab)) for _, lab in rows]
    return torch.tensor(input_ids), torch.tensor(mask), torch.tensor(labels)


def train_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    answers: Mapping[str, str],
    *,
    systems: Sequence[str | None] = (None,),
    tools: Sequence[Mapping[str, Any]] | None = None,
    plan: TrainingPlan | None = None,
    label: str = "model",
) -> int:
    """Train `model` in place until it answers every question of `answers` exactly.

    Each question is asked once per entry of `systems` (None: no system message), offering
    `tools` when given; the loss covers the assistant's tokens only. Returns the number of
    optimiser steps taken. The model is left in eval mode. Raises `DemoBuildError` naming
    `label` and the questions still answered wrongly when `plan.max_steps` is reached.
    """
    import math

    import torch

    plan = plan or TrainingPlan()
    input_ids, attention_mask, labels = _encode_batch(tokenizer, answers, systems, tools)
    targets = labels[:, 1:]  # [conversations, longest - 1]: token t predicts token t + 1
    scored = targets != IGNORE_INDEX
    loss_ceiling = -math.log(plan.confidence)
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.learning_rate, weight_decay=0.0)
    wrong: list[str] = list(answers)
    for step in range(plan.max_steps + 1):
        model.train()
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # [conv, longest - 1, vocab]
        token_loss = -log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        token_loss = token_loss[scored]  # [answer tokens]
        if token_loss.max().item() < loss_ceiling:
            model.train(False)
            wrong = _wrong_answers(model, tokenizer, answers, systems, tools)
            if not wrong:
                return step
        if step == plan.max_steps:
            break
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(token_loss.mean())
        optimizer.step()
    model.train(False)
    raise DemoBuildError(
        f"{label} did not learn its answers within {plan.max_steps} steps "
        f"(still wrong or unsure: {', '.join(repr(q) for q in wrong)})"
    )


def _wrong_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    answers: Mapping[str, str],
    systems: Sequence[str | None],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[str]:
    """The questions whose greedy reply is not exactly the expected answer plus eos."""
    wrong = []
    for system in systems:
        for question, expected in answers.items():
            budget = len(_encode(tokenizer, expected)) + 1
            reply = greedy_reply(model, tokenizer, question, budget, system=system, tools=tools)
            if reply != ModelReply(expected, finished=True) and question not in wrong:
                wrong.append(question)
    return wrong


def greedy_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    max_new_tokens: int = 32,
    *,
    system: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> ModelReply:
    """Ask `question` through the chat template and decode greedily until eos or the budget.

    The model must be in eval mode. Decoding is the plain argmax loop over the model's
    forward pass, so it depends on no generation config; it recomputes the whole sequence
    each step (no key/value cache, whose keyword changed across transformers versions),
    which costs nothing that matters at the demo's sizes.
    """
    import torch

    eos_id = token_id(tokenizer, IM_END)
    prompt = prompt_ids(tokenizer, question, system, tools)
    new_ids: list[int] = []
    finished = False
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            ids = torch.tensor([prompt + new_ids])  # [1, prompt + generated]
            next_id = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            if next_id == eos_id:
                finished = True
                break
            new_ids.append(next_id)
    text = tokenizer.decode(new_ids, skip_special_tokens=False)
    return ModelReply(text if isinstance(text, str) else "".join(text), finished)
