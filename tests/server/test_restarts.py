"""A real `hotweights serve --repo` process: SIGKILL mid-reload, restart, SIGHUP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from hotweights.sources import publish
from hotweights.testing import free_port

pytestmark = pytest.mark.llm


class ServerProcess:
    def __init__(self, repo: Path, log: IO[str], *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "hotweights.cli", "serve", "--repo", str(repo)]
        command += ["--port", str(self.port), *extra]
        env = {**os.environ, "HOTWEIGHTS_LOG_LEVEL": "warning"}
        self.process = subprocess.Popen(command, env=env, stderr=log)

    def status(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/admin/status", timeout=10)
        body: dict[str, Any] = response.json()["models"]["tiny"]
        return body

    def wait_for(self, what: str, check: Any, timeout: float = 90) -> None:
        """Poll (paced, bounded) until `check()` is true: a process has no observer hook."""
        ticks = threading.Event()
        for _ in range(int(timeout / 0.1)):
            if self.process.poll() is not None:
                pytest.fail(f"the server exited ({self.process.returncode}) waiting for {what}")
            try:
                if check():
                    return
            except httpx.TransportError:
                pass
            ticks.wait(0.1)
        pytest.fail(f"timed out waiting for {what}")

    def live_source(self) -> str | None:
        live = self.status()["live"]
        return None if live is None else str(live["source"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


@pytest.fixture
def log(tmp_path: Path) -> Iterator[IO[str]]:
    with (tmp_path / "servers.log").open("w") as file:
        yield file


def test_sigkill_mid_reload_then_restart_serves_a_good_version(
    tmp_path: Path, log: IO[str]
) -> None:
    from hotweights.demo.tinylm import save_tiny_model

    repo = tmp_path / "repo"
    builds = [save_tiny_model(tmp_path / "build" / str(i), seed=i) for i in (1, 2, 3)]
    first = publish(builds[0], repo, "tiny")
    server = ServerProcess(repo, log, "--watch", "poll", "--poll-interval", "0.1")
    try:
        server.wait_for("generation 1", lambda: server.live_source() == str(first.path))
        # A publisher killed mid-copy leaves a hidden staging directory; a half-written
        # manifest-less version is still settling. Neither may ever load.
        staging = repo / "tiny" / ".tmp-publish-crashed"
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"\0" * 100)
        torn = repo / "tiny" / "9"
        torn.mkdir()
        (torn / "config.json").write_text("{")
        second = publish(builds[1], repo, "tiny")

        def reloading_or_done() -> bool:
            status = server.status()
            live = status["live"]
            return status["reloading"] is not None or (live or {}).get("source") == str(second.path)

        server.wait_for("the reload to start", reloading_or_done)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(30)
    finally:
        server.stop()

    again = ServerProcess(repo, log, "--watch", "poll", "--poll-interval", "3600")
    try:
        again.wait_for("a live version", lambda: again.live_source() is not None)
        assert again.live_source() == str(second.path)
        chat = httpx.post(
            f"{again.url}/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
            },
            timeout=30,
        )
        assert chat.status_code == 200
        assert chat.json()["system_fingerprint"].startswith("hw-g1-")
        # SIGHUP rescans (the poll interval is an hour, so nothing else would).
        third = publish(builds[2], repo, "tiny")
        again.process.send_signal(signal.SIGHUP)
        again.wait_for("SIGHUP to bring v3 live", lambda: again.live_source() == str(third.path))
    finally:
        again.stop()
