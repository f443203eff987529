"""A Ray head node started apart from the tests' own cluster (`ray start --head` on
127.0.0.1, in its own process group, which `stop` ends), for the tests that run a fleet
on a cluster it joins: every fleet there is a process of its own (this process may be
attached to the other tests' cluster)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

import hotweights
from hotweights.testing import free_port
from tests.fleet.cluster import MODEL

DEADLINE_S = 180.0


class Cluster:
    """A head node on loopback, and the Serve port its applications share."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.address = f"127.0.0.1:{free_port()}"
        self.http = f"http://127.0.0.1:{free_port()}"
        self.env = os.environ | {
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",  # the cluster's own token, for it and its clients only
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "PYTHONPATH": os.pathsep.join(
                [str(Path(hotweights.__file__).parents[1]), str(Path.cwd())]
            ),
        }
        self.head: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        ray = Path(sys.executable).parent / "ray"
        port = self.address.rsplit(":", 1)[1]
        command = [
            str(ray), "start", "--head", "--block", f"--port={port}",
            "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--num-cpus=4",
            f"--temp-dir={self.root}", "--disable-usage-stats",
        ]  # fmt: skip
        with (self.root / "head.log").open("wb") as log:
            self.head = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=log, start_new_session=True
            )
        until(lambda: listening(self.address), "the head node listens")

    def stop(self) -> None:
        """End the head's process group, then anything still running from its directory."""
        if self.head is not None:
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                os.killpg(self.head.pid, signal.SIGTERM)
            try:
                self.head.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, psutil.Error):
                    os.killpg(self.head.pid, signal.SIGKILL)
        for process in psutil.process_iter(["cmdline"]):
            if str(self.root) in " ".join(process.info["cmdline"] or ()):
                with contextlib.suppress(ProcessLookupError, psutil.Error):
                    process.kill()

    def fleet(self, repo: Path, *extra: str) -> list[str]:
        port = self.http.rsplit(":", 1)[1]
        return [
            sys.executable, "-m", "hotweights.cli", "fleet", "--repo", str(repo),
            "--model", MODEL, "--replicas", "1", "--ray-address", self.address,
            "--port", port, "--watch", "poll", *extra,
        ]  # fmt: skip


def listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, int(port))) == 0


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)
