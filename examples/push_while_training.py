"""Train, and push the weights to a running server every N steps while a client samples.

A few lines of torch train the tiny demo model (built here, no download) on one chat
answer; every `--every` steps `hotweights.push` sends the weights to the server, which
makes them live without a restart and without a failed request. A client thread asks the
same question all the while; each answer names the generation that produced it (the
`x-hotweights-generation` header), so you can watch the answers change as training goes.

    python examples/push_while_training.py                 # starts a server of its own
    python examples/push_while_training.py --url http://127.0.0.1:8000 --token T
        # a server already running (its model must be the demo model: same config, same
        # tokenizer: `hotweights serve --model-dir DIR` on a directory this script saved
        # with --save DIR)
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

import hotweights
from hotweights.core import ReloadEvent
from hotweights.demo.tinylm import IM_END, build_model, build_tokenizer, save_pretrained
from hotweights.demo.training import IGNORE_INDEX, prompt_ids

QUESTION = "Which version are you?"
ANSWER = "I am still training."


@dataclass
class Run:
    """What one run saw: each push's event and each sample, in order."""

    pushes: list[ReloadEvent] = field(default_factory=list)
    samples: list[tuple[int, str]] = field(default_factory=list)
    """(generation, answer) of every sample the client took."""
    failed: list[str] = field(default_factory=list)


def main(argv: Sequence[str] | None = None) -> Run:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one here)")
    parser.add_argument("--token", help="its admin token")
    parser.add_argument("--model", default="m", help="the served model's name")
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps in all")
    parser.add_argument("--every", type=int, default=20, help="push every this many steps")
    parser.add_argument("--save", type=Path, help="save the initial model here and exit")
    args = parser.parse_args(argv)

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0)
    if args.save is not None:
        save_pretrained(args.save, model, tokenizer)
        return Run()
    if args.url is not None:
        return train_and_push(model, tokenizer, args.url, args.model, args.token, args)
    from hotweights.config import Config
    from hotweights.server.assembly import build_state
    from hotweights.testing import ServerThread

    with tempfile.TemporaryDirectory() as workdir:
        source = save_pretrained(Path(workdir) / "initial", model, tokenizer)
        config = Config.load(
            {"source": str(source), "model_name": args.model, "model_roots": (workdir,)},
            environ={},
        )
        server = ServerThread(build_state(config)).start()
        try:
            server.wait_live()
            return train_and_push(model, tokenizer, server.url, args.model, None, args)
        finally:
            server.stop()


def train_and_push(
    model: Any, tokenizer: Any, url: str, name: str, token: str | None, args: Any
) -> Run:
    run = Run()
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(url, name, stop, run), daemon=True)
    sampler.start()
    prompt = prompt_ids(tokenizer, QUESTION)
    target = tokenizer(ANSWER + IM_END, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + target])  # [1, tokens]
    labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + target])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    try:
        for step in range(1, args.steps + 1):
            model.train()
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % args.every == 0:
                model.eval()
                text = f"step {step}, loss {loss.item():.3f}"
                event = hotweights.push(url, model, model=name, token=token, description=text)
                run.pushes.append(event)
                print(f"{text}: live as g{event.new_generation}")
    finally:
        stop.set()
        sampler.join()
    with httpx.Client(base_url=url, timeout=60) as client:  # one more, after the last push
        run.samples.append(_ask(client, name))
    return run


def _sample(url: str, name: str, stop: threading.Event, run: Run) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            try:
                generation, answer = _ask(client, name)
            except Exception as exc:  # counted, not hidden: the point is that none fail
                run.failed.append(repr(exc))
                continue
            run.samples.append((generation, answer))
            print(f"  sample from g{generation}: {answer!r}")


def _ask(client: httpx.Client, name: str) -> tuple[int, str]:
    messages = [{"role": "user", "content": QUESTION}]
    body = {"model": name, "messages": messages, "max_tokens": 24, "temperature": 0}
    response = client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    answer = response.json()["choices"][0]["message"]["content"]
    return int(response.headers["x-hotweights-generation"]), str(answer)


if __name__ == "__main__":
    done = main()
    print(f"{len(done.pushes)} pushes, {len(done.samples)} samples, {len(done.failed)} failed")
