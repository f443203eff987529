"""`bridge.answer`: one request through a real hotweights app, in process, pinned to a
generation through the ASGI scope; a stream closed early lets go of its lease."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from hotweights.config import Config
from hotweights.core import Outcome, PreparedVersion, Reloader
from hotweights.fleet.bridge import Forwarded, Head, answer
from hotweights.server.app import create_app
from hotweights.server.assembly import build_state
from hotweights.server.server_state import ServerState
from tests.fakes import FakeTextLoader

"""A fleet replica's hold: the second version stays resident, reachable only when pinned."""
EXTRA = (b"x-hotweights-replica", b"replica-1")


@dataclass
class Served:
    """An app serving `m` with g1 live and g2 held beside it."""

    app: FastAPI
    state: ServerState
    reloader: Reloader[Any]
    loader: FakeTextLoader
    sources: dict[int, str]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    sources = {1: str(tmp_path / "m" / "1"), 2: str(tmp_path / "m" / "2")}
    config = Config.load(
        {"source": sources[1], "model_name": "m", "model_roots": (str(tmp_path),)}, environ={}
    )
    loader = FakeTextLoader()
    state = build_state(config, loader)
    reloader = state.resolve("m").reloader
    try:
        assert reloader.reload(sources[1], generation=1, timeout=10).outcome is Outcome.LIVE
        held = reloader.prepare(sources[2], generation=2).wait(10)
        assert isinstance(held, PreparedVersion), "g2 was not held beside g1"
        yield Served(create_app(state), state, reloader, loader, sources)
    finally:
        state.close(timeout=10)


def chat(*, stream: bool = False, max_tokens: int = 2) -> Forwarded:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    return Forwarded(
        method="POST",
        path="/v1/chat/completions",
        query=b"",
        headers=((b"content-type", b"application/json"), (b"host", b"replica")),
        body=json.dumps(body).encode(),
    )


def opened(stream: AsyncIterator[Head | bytes]) -> AsyncGenerator[Head | bytes, None]:
    """`answer` is an async generator: the caller may close it early."""
    assert isinstance(stream, AsyncGenerator)
    return stream


async def everything(stream: AsyncIterator[Head | bytes]) -> tuple[Head, list[bytes]]:
    items = [item async for item in stream]
    head, rest = items[0], items[1:]
    assert isinstance(head, Head)
    chunks = [item for item in rest if isinstance(item, bytes)]
    assert len(chunks) == len(rest), f"a second Head among {rest!r}"
    return head, chunks


def header(head: Head, name: bytes) -> str:
    values = [value for key, value in head.headers if key.lower() == name]
    assert len(values) == 1, f"{name!r} in {head.headers!r}"
    return values[0].decode()


async def test_a_non_stream_answer_is_one_head_with_the_body_and_the_extra_header(
    served: Served,
) -> None:
    head, chunks = await everything(answer(served.app, chat(), "g1", (EXTRA,)))
    assert (head.status, head.streamed, chunks) == (200, False, [])
    assert header(head, b"x-hotweights-replica") == "replica-1"
    assert header(head, b"x-hotweights-generation") == "1"
    assert header(head, b"content-type") == "application/json"
    reply = json.loads(head.body)
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"].startswith(f"{served.sources[1]}:0")
    assert served.reloader.inflight() == {1: 0, 2: 0}


@pytest.mark.parametrize("generation", [1, 2])
async def test_the_pin_reaches_the_version_of_its_generation(
    served: Served, generation: int
) -> None:
    head, _ = await everything(answer(served.app, chat(), f"g{generation}"))
    assert head.status == 200
    assert header(head, b"x-hotweights-generation") == str(generation)
    content = json.loads(head.body)["choices"][0]["message"]["content"]
    assert content.startswith(f"{served.sources[generation]}:0")
    assert served.reloader.live_version is not None
    assert served.reloader.live_version.generation == 1  # the pin changed nothing


async def test_a_stream_is_a_streamed_head_then_its_sse_bytes(served: Served) -> None:
    head, chunks = await everything(answer(served.app, chat(stream=True), "g2", (EXTRA,)))
    assert (head.status, head.streamed, head.body) == (200, True, b"")
    assert header(head, b"x-hotweights-generation") == "2"
    assert header(head, b"x-hotweights-replica") == "replica-1"
    assert header(head, b"content-type").startswith("text/event-stream")
    text = b"".join(chunks)
    assert text.startswith(b"data: ")
    assert text.endswith(b"data: [DONE]\n\n")
    events = [json.loads(line[6:]) for line in text.split(b"\n\n") if line.startswith(b"data: {")]
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert content == f"{served.sources[2]}:0 {served.sources[2]}:1 "
    assert served.reloader.inflight() == {1: 0, 2: 0}


async def test_closing_a_stream_after_its_head_releases_the_lease(served: Served) -> None:
    reached, release = threading.Event(), threading.Event()

    def hold_at_step_one(step: int) -> None:  # on a generation worker thread
        if step == 1:
            reached.set()
            release.wait(30)

    model = next(m for m in served.loader.models if m.source == served.sources[2])
    model.before_step = hold_at_step_one
    stream = opened(answer(served.app, chat(stream=True, max_tokens=50), "g2"))
    try:
        head = await anext(stream)
        assert isinstance(head, Head)
        assert (head.status, head.streamed) == (200, True)
        assert await asyncio.to_thread(reached.wait, 10), "the stream never reached step 1"
        assert served.reloader.inflight() == {1: 0, 2: 1}
        await asyncio.wait_for(stream.aclose(), timeout=10)
        # `answer` waits for the app to let go of the request before `aclose` returns,
        # and the app's stream releases its lease on the way out: nothing left to wait for.
        assert served.reloader.inflight() == {1: 0, 2: 0}
    finally:
        release.set()


async def test_a_pin_to_a_generation_not_resident_answers_404(served: Served) -> None:
    head, chunks = await everything(answer(served.app, chat(), "g7", (EXTRA,)))
    assert (head.status, head.streamed, chunks) == (404, False, [])
    assert header(head, b"x-hotweights-replica") == "replica-1"
    error = json.loads(head.body)["error"]
    assert error["code"] == "model_not_found"
    assert "g7" in error["message"]
    assert "(g1)" in error["message"]
    assert "(g2)" in error["message"]
    assert served.reloader.inflight() == {1: 0, 2: 0}


@pytest.mark.parametrize("generation", [1, 2])
async def test_models_name_the_generation_the_ingress_stamped(
    served: Served, generation: int
) -> None:
    """Between the fleet's commit and a replica's finish the replica's live version is the
    old one, but the ingress already stamps the new generation: /v1/models says that."""
    listing = Forwarded("GET", "/v1/models", b"", ((b"host", b"replica"),), b"")
    head, _ = await everything(answer(served.app, listing, f"g{generation}"))
    assert head.status == 200
    [model] = json.loads(head.body)["data"]
    assert model["generation"] == generation
    assert model["fingerprint"].startswith(f"hw-g{generation}-")
    assert served.reloader.live_version is not None
    assert served.reloader.live_version.generation == 1
