"""Overload: a burst far beyond the admission queue, and a client that reads a stream slowly.

(A client that hangs up mid-stream is in test_streams.py.)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.fakes import FakeTextLoader, StepGate
from tests.server.conftest import Serve
from tests.server.test_streams import _chat, _events, _reload

BURST = 500
MAX_PENDING = 8
RSS_GROWTH_LIMIT = 200 * 2**20
"""Generous: 500 connections' buffers on both sides, a few MiB each at worst."""


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll a condition the server changes with no event to wait on (a stream's lease is
    released just after its last byte is sent, when the client may already have it)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.01)
    return True


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def events(self) -> list[Any]:
        return list(_events(iter(self.body.decode().splitlines())))


async def _exchange(
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], body: dict[str, Any]
) -> RawResponse:
    """One HTTP/1.0 request on an open connection: the server closes it after the answer,
    so the body is everything up to EOF, streams included (no chunked framing)."""
    reader, writer = connection
    payload = json.dumps(body).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.0\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    writer.write(head.encode() + payload)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    header_block, _, content = data.partition(b"\r\n\r\n")
    status_line, *header_lines = header_block.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(int(status_line.split()[1]), headers, content)


async def test_a_burst_of_500_connections_gets_429s_and_the_admitted_finish(
    serve: Serve, tmp_path: Path
) -> None:
    gate = StepGate(at=0)  # every admitted request holds at its first token
    server = serve(FakeTextLoader(before_step=gate), tmp_path / "1", max_pending=MAX_PENDING)
    served = server.state.models["m"]
    process = psutil.Process()
    rss_before = process.memory_info().rss
    # All 500 connections are open before the first request is sent.
    connections = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", server.port) for _ in range(BURST))
    )
    refused = 0
    all_refused = asyncio.Event()

    async def ask(i: int) -> RawResponse:
        nonlocal refused
        response = await _exchange(connections[i], _chat(i % 2 == 0, 3))
        if response.status == 429:
            refused += 1
            if refused == BURST - MAX_PENDING:
                all_refused.set()
        return response

    tasks = [asyncio.create_task(ask(i)) for i in range(BURST)]
    try:
        # Nothing admitted can finish before the gate opens: exactly MAX_PENDING are
        # admitted and every other request is refused at once.
        await asyncio.wait_for(all_refused.wait(), 60)
        assert served.pending == MAX_PENDING
    finally:
        gate.release()
    responses = await asyncio.wait_for(asyncio.gather(*tasks), 60)

    statuses = [r.status for r in responses]
    assert sorted(set(statuses)) == [200, 429], statuses
    assert statuses.count(200) == MAX_PENDING
    for response in responses:
        if response.status == 429:
            assert response.headers["retry-after"] == "1"
            assert json.loads(response.body)["error"]["code"] == "overloaded"
        elif response.headers["content-type"].startswith("text/event-stream"):
            events = response.events()
            assert events[-1] == "[DONE]"
            assert all("error" not in event for event in events[:-1])
        else:
            assert json.loads(response.body)["choices"][0]["finish_reason"] == "length"
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        after = await client.post("/v1/chat/completions", json=_chat(False, 2))
        assert after.status_code == 200
    assert _wait_for(lambda: served.pending == 0), f"{served.pending} requests still counted"
    growth = process.memory_info().rss - rss_before
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.0f} MiB"


def test_a_slow_reader_keeps_its_generation_through_a_reload(serve: Serve, tmp_path: Path) -> None:
    """A reader that lags far behind its stream: the server waits on it without blocking
    anyone else, g2 goes live meanwhile, and the stream still ends on g1."""
    # A fake token is its source path: a long directory name makes 4 KiB tokens and a
    # 16 MiB stream, far more than the kernel's socket buffers (a few MiB at most) hold,
    # so the server really waits on this reader. No file is read at these paths.
    root = tmp_path / ("slow-reader-" + "x" * 4000)
    v1, v2 = root / "1", root / "2"
    tokens, held_at = 4096, 3000
    gate = StepGate(at=held_at)  # generation stops mid-way until g2 is live
    loader = FakeTextLoader(before_step=gate)
    server = serve(loader, v1, max_tokens_limit=tokens)
    reloader = server.state.models["m"].reloader
    fingerprints: set[str] = set()
    text: list[str] = []
    served_meanwhile: list[str] = []
    with (
        httpx.Client(base_url=server.url, timeout=30) as slow,
        httpx.Client(base_url=server.url, timeout=10) as other,
        slow.stream("POST", "/v1/chat/completions", json=_chat(True, tokens)) as response,
    ):
        assert response.headers["x-hotweights-generation"] == "1"
        events = _events(response.iter_lines())
        try:
            for i, event in enumerate(events):
                if event == "[DONE]":
                    break
                assert "error" not in event, event
                fingerprints.add(event["system_fingerprint"])
                text.append(event["choices"][0]["delta"].get("content") or "")
                if i == 0:
                    # 12 MiB generated, a few read: the server is waiting on this reader.
                    assert gate.reached.wait(30)
                elif i == 10:
                    assert _reload(server, v2).json()["new_generation"] == 2
                    assert reloader.slot.inflight() == {2: 0, 1: 1}  # this stream's lease
                elif 20 <= i < 30:  # others are served while this reader lags
                    answer = other.post("/v1/chat/completions", json=_chat(False, 2))
                    served_meanwhile.append(answer.headers["x-hotweights-generation"])
                    assert other.get("/health").status_code == 200
                elif i == 30:
                    gate.release()  # the rest of the generation runs on g1, g2 being live
                if i <= 30:
                    # Pacing, not synchronisation: one event each 10 ms is the slow reader.
                    threading.Event().wait(0.01)
            else:
                raise AssertionError("the stream ended without [DONE]")
        finally:
            gate.release()
    assert served_meanwhile == ["2"] * 10
    assert len(fingerprints) == 1
    assert fingerprints.pop().startswith("hw-g1-")
    assert "".join(text) == "".join(f"{v1}:{i} " for i in range(tokens))
    assert reloader.wait_drained(10)
    assert loader.models[0].unloaded
