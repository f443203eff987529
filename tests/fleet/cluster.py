"""What the fleet's tests on a real local Ray cluster share: clients sending traffic, the
running fleet with its repository, and the conditions they wait for."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from hotweights.demo.tinylm import save_tiny_model
from hotweights.sources import publish
from tests.fleet import faults

if TYPE_CHECKING:
    from hotweights.fleet import deployment

MODEL = "tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}


@dataclass
class Answer:
    sent_at: float
    status: int
    generation: int | None
    replica: str | None = None
    error: str | None = None
    ended_at: float = 0.0
    model: str = MODEL
    adapter_generation: int | None = None
    """For a LoRA adapter: its generation (`generation` is its base's)."""


@dataclass
class Traffic:
    """Clients sending chat completions (every other one streamed) until stopped."""

    url: str
    clients: int = 3
    models: tuple[str, ...] = (MODEL,)
    """The models asked, in turn by client."""
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _going: threading.Event = field(default_factory=threading.Event)
    _idle: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))

    def pause(self, timeout: float = 60.0) -> None:
        """Send nothing new until `resume`; returns once every request sent has come back."""
        self._going.clear()
        for _ in self._threads:
            if not self._idle.acquire(timeout=timeout):
                raise AssertionError(f"a client did not finish its request in {timeout} s")

    def resume(self) -> None:
        self._going.set()

    def __enter__(self) -> Traffic:
        self._going.set()
        for index in range(self.clients):
            thread = threading.Thread(target=self._client, args=(index,), daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._going.set()
        for thread in self._threads:
            thread.join(60)

    def wait_for(self, count: int, after: float = 0.0, timeout: float = 60.0) -> None:
        """Until `count` answers to requests sent after `after` (wall clock) came back."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if sum(a.sent_at > after for a in self.answers) >= count:
                    return
            self._stop.wait(0.05)
        raise AssertionError(f"fewer than {count} answers after {after} in {timeout} s")

    @property
    def failed(self) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if a.status != 200 or a.error is not None]

    def _client(self, index: int) -> None:
        stream = index % 2 == 1
        model = self.models[index % len(self.models)]
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                if not self._going.is_set():
                    self._idle.release()
                    self._going.wait()
                    continue
                self._record(self._ask(client, stream, model))
                stream = not stream

    def _ask(self, client: httpx.Client, stream: bool, model: str = MODEL) -> Answer:
        sent_at = time.time()
        body = {**CHAT, "model": model, "stream": stream}
        try:
            response = client.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            return Answer(sent_at, 0, None, error=repr(exc))
        generation = response.headers.get("x-hotweights-generation")
        answer = Answer(
            sent_at,
            response.status_code,
            int(generation) if generation else None,
            response.headers.get("x-hotweights-replica"),
            model=model,
        )
        adapter = response.headers.get("x-hotweights-adapter-generation")
        answer.adapter_generation = int(adapter) if adapter else None
        if stream and not response.text.rstrip().endswith("data: [DONE]"):
            answer.error = f"stream ended without [DONE]: {response.text[-200:]!r}"
        elif response.status_code != 200:
            answer.error = response.text[:300]
        return answer

    def _record(self, answer: Answer) -> None:
        answer.ended_at = time.time()
        with self._lock:
            self.answers.append(answer)


@dataclass
class Running:
    fleet: deployment.Fleet
    repo: Path
    builds: Path
    admin: httpx.Client

    def status(self) -> dict[str, Any]:
        response = self.admin.get("/admin/fleet")
        assert response.status_code == 200, response.text
        status: dict[str, Any] = response.json()
        return status

    def publish(self, seed: int, *, fault: bool = False, hold: bool = False) -> int:
        source = save_tiny_model(self.builds / f"seed-{seed}-{fault}-{hold}", seed=seed)
        if fault:
            (source / faults.FAULT_FILE).write_text("this version fails on one replica\n")
        if hold:
            (source / faults.HOLD_FILE).write_text("loads once released\n")
        return publish(source, self.repo, MODEL).version

    def answers(self) -> dict[str, Any] | None:
        """/admin/fleet, or None while it does not answer (the ingress is restarting)."""
        try:
            response = self.admin.get("/admin/fleet")
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def wait(self, condition: Callable[[dict[str, Any]], bool], timeout: float = 90.0) -> Any:
        """Poll /admin/fleet until `condition` holds (the fleet runs in other processes:
        its status is the only thing to wait on)."""
        deadline = time.monotonic() + timeout
        status = self.status()
        while not condition(status):
            assert time.monotonic() < deadline, f"fleet never got there: {status}"
            time.sleep(0.1)
            status = self.status()
        return status


def live_everywhere(generation: int) -> Callable[[dict[str, Any]], bool]:
    def check(status: dict[str, Any]) -> bool:
        replicas = status["replicas"]
        return (
            status["committed"]["generation"] == generation
            and len(replicas) == 2
            and all(r.get("live") == generation for r in replicas)
            and all([v["generation"] for v in r["resident"]] == [generation] for r in replicas)
        )

    return check
