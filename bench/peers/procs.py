"""Processes the benchmark starts: spawn in their own group, wait for HTTP, stop, measure.

Every server runs in a new session so that it and all it spawns (TorchServe's Java
frontend and Python workers, Ray's daemons) stop together by process group, and only
the groups this benchmark started are ever signalled.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

from peers.system import PeerUnavailable, Stage


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spawn(
    command: Sequence[str | Path],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin: int | None = subprocess.DEVNULL,
) -> subprocess.Popen[bytes]:
    """Start `command` in a new session, stdout and stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(part) for part in command],
            stdin=stdin,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )


def stop_group(process: subprocess.Popen[Any] | None, timeout: float = 20.0) -> None:
    """SIGTERM the process group `process` leads, then SIGKILL what is left after `timeout`."""
    if process is None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; give its group a moment, then make sure nothing lingers.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _group_alive(process.pid):
            time.sleep(0.1)
        if _group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
        break


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tail(log: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log, for an error message."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def wait_http(
    url: str,
    *,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    stage: Stage = "start",
) -> None:
    """Poll `url` until it answers 2xx; raise `PeerUnavailable` if `process` exits first or
    `timeout` passes."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            detail = tail(log) if log else ""
            raise PeerUnavailable(stage, f"exited with {process.returncode}: {detail}")
        try:
            response = httpx.get(url, timeout=2.0)
            if response.is_success:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.25)
    detail = tail(log) if log else ""
    raise PeerUnavailable(stage, f"{url} not ready after {timeout:.0f} s ({last}) {detail}")


def run_step(
    command: Sequence[str | Path],
    log: Path,
    *,
    timeout: float,
    stage: Stage,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> None:
    """Run a bounded command to completion (its own group); raise `PeerUnavailable` naming
    it when it fails or overruns."""
    process = spawn(command, log, env=env, cwd=cwd)
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        stop_group(process, timeout=5)
        raise PeerUnavailable(
            stage, f"`{_show(command)}` took over {timeout:.0f} s: {tail(log, 5)}"
        ) from None
    if code != 0:
        raise PeerUnavailable(stage, f"`{_show(command)}` exited {code}: {tail(log, 8)}")


def _show(command: Sequence[str | Path]) -> str:
    return " ".join(str(part) for part in command)[:300]


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (0 once it is gone)."""
    return tree_usage(pid)[0]


def tree_usage(pid: int) -> tuple[int, dict[int, float]]:
    """Resident bytes of `pid` and all its descendants, and the CPU seconds (user plus
    system) each of them has used so far."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, {}
    total = 0
    cpu: dict[int, float] = {}
    for process in processes:
        try:
            with process.oneshot():
                total += process.memory_info().rss
                times = process.cpu_times()
            cpu[process.pid] = times.user + times.system
        except psutil.Error:
            continue
    return total, cpu


def wait_quiet(max_wait: float, threshold: float = 0.3, window: float = 2.0) -> dict[str, float]:
    """Wait, up to `max_wait` seconds, until the whole machine is busy for less than
    `threshold` cores over `window` seconds: other processes sharing the machine (a test
    run) slow every system down several times, and the report should not measure them.
    Returns the seconds waited and the busy cores last seen."""
    began = time.monotonic()
    cores = os.cpu_count() or 1
    while True:
        busy = psutil.cpu_percent(interval=window) / 100 * cores
        waited = time.monotonic() - began
        if busy < threshold or waited >= max_wait:
            return {"waited_s": round(waited, 1), "busy_cores": round(busy, 2)}


def ensure_venv(
    where: Path, requirements: Sequence[Sequence[str]], *, timeout: float, log: Path
) -> Path:
    """A virtual environment in `where` holding `requirements`, installed step by step (each
    step a `pip install` argument list, torch pinned first) and reused while its stamp
    matches; returns its python. Raises `PeerUnavailable("install", ...)`."""
    python = where / "bin" / "python"
    stamp = where / ".bench-installed"
    wanted = "\n".join(" ".join(step) for step in requirements)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    where.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    if not python.exists():
        create: list[str | Path] = [sys.executable, "-m", "venv", where]
        run_step(create, log, timeout=120, stage="install")
    for step in requirements:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerUnavailable("install", f"installing took over {timeout:.0f} s")
        command: list[str | Path] = [python, "-m", "pip", "install", "--quiet", *step]
        run_step(command, log, timeout=left, stage="install")
    stamp.write_text(wanted)
    return python


class InstalledPeer:
    """What a peer installed into its own virtual environment keeps: the environment
    (`cache/venv`), its working directory, its log, its timeouts and its address."""

    name = ""
    requirements: tuple[tuple[str, ...], ...] = ()
    """Groups of pip requirements, installed one group after another."""
    log_name = ""

    def __init__(
        self, cache: Path, workdir: Path, install_timeout: float, start_timeout: float
    ) -> None:
        self.venv = cache / "venv"
        self.workdir = workdir
        self.install_timeout = install_timeout
        self.start_timeout = start_timeout
        self.log = workdir / self.log_name
        self.base_url = ""

    def install(self) -> None:
        ensure_venv(
            self.venv,
            self.requirements,
            timeout=self.install_timeout,
            log=self.workdir / "install.log",
        )
