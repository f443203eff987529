"""Ray Serve as a benchmarked system, in two rows, one per way of deploying a new version.

A driver process in Ray's own environment (`handlers/ray_app.py`) starts a local Ray
cluster on loopback (no dashboard), deploys the application from a config and deploys
each new version as a new config, the way `serve deploy` does:

- `ray-serve/reconfigure`: one replica; a new version changes only the deployment's
  `user_config`, Ray's documented in-place update: the running replica's `reconfigure`
  loads the new weights, no replica starts. Live once Serve reports the update done.
- `ray-serve/rolling`: two replicas; a new version changes the application's `args`
  (the replicas' constructor arguments), a new code version to Serve: a rolling update
  with one surge replica (`max_surge_percent=50`), so new replicas start while the old
  keep serving and an old one stops, after finishing its requests, once its replacement
  runs. Live once the rollout finished: every replica new, RUNNING and HEALTHY (when the
  first new replica ran is in the reload's `server`).

Both run every replica with `num_cpus: 0` (the machine has two cores; Ray keeps some).
The whole cluster stops with the driver's process group.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
from pathlib import Path
from typing import IO, Any, Literal

from peers.procs import InstalledPeer, free_port, stop_group, tail, wait_http
from peers.system import Clock, ModelVersion, PeerUnavailable, ReloadResult, Request, Workload

HANDLERS = Path(__file__).resolve().parent / "handlers"
REQUIREMENTS = (("torch==2.13.0",), ("ray[serve]", "transformers", "safetensors"))
RayUpdate = Literal["reconfigure", "rolling"]
"""How a new version is deployed (see the module's docstring); `ray_app.py`'s mode."""


class RayServeSystem(InstalledPeer):
    requirements = REQUIREMENTS
    log_name = "ray.log"

    def __init__(
        self,
        cache: Path,
        workdir: Path,
        install_timeout: float,
        start_timeout: float,
        update: RayUpdate = "reconfigure",
    ) -> None:
        super().__init__(cache, workdir, install_timeout, start_timeout)
        self.update = update
        self.name = f"ray-serve/{update}"
        self._process: subprocess.Popen[str] | None = None
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        # Ray's socket paths must stay short; a temp dir of its own keeps clusters apart.
        self._temp = Path("/tmp") / f"hwb-ray-{os.getpid()}-{update}"

    def start(self, first: ModelVersion) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "PYTHONPATH": str(HANDLERS),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_SERVE_ENABLE_TASK_EVENTS": "0",
        }
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            str(self.venv / "bin" / "python"),
            str(HANDLERS / "ray_app.py"),
            self.update,
            str(port),
            str(self._temp),
            json.dumps(self._config(first)),
        ]
        log = self.log.open("a")
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        stdout = self._process.stdout
        if stdout is None:
            raise PeerUnavailable("start", "no stdout from the Ray driver")
        threading.Thread(target=self._read, args=(stdout,), daemon=True).start()
        ready = self._reply(self.start_timeout)
        if not ready.get("ready"):
            raise PeerUnavailable("start", f"{ready} {tail(self.log)}")
        wait_http(f"{self.base_url}/-/healthz", timeout=60, process=None, log=self.log)

    def _config(self, version: ModelVersion) -> dict[str, Any]:
        return {"path": str(version.path), "version": version.number}

    def _read(self, stdout: IO[str]) -> None:
        with self.log.open("a") as log:
            for line in stdout:
                if line.startswith("BENCH "):
                    self._replies.put(json.loads(line.removeprefix("BENCH ")))
                else:
                    log.write(line)
                    log.flush()
        self._replies.put({"ok": False, "error": "the Ray driver exited"})

    def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            return self._replies.get(timeout=timeout)
        except queue.Empty:
            return {"ok": False, "error": f"no answer from the Ray driver in {timeout:.0f} s"}

    def server_pid(self) -> int:
        if self._process is None:
            raise PeerUnavailable("run", "not started")
        return self._process.pid

    def request(self, workload: Workload) -> Request:
        return Request("/bench", {"prompt": workload.prompt, "max_tokens": workload.max_tokens})

    def answer_label(self, headers: dict[str, str], body: Any) -> tuple[str, str]:
        return str(body["version"]), str(body["text"])

    def version_of(self, label: str) -> int | None:
        return int(label)

    def reload(self, version: ModelVersion, clock: Clock) -> ReloadResult:
        trigger = clock()
        if self._process is None or self._process.stdin is None:
            return ReloadResult(version.number, version.weights, trigger, trigger, False, "down")
        try:
            self._process.stdin.write(json.dumps(self._config(version)) + "\n")
            self._process.stdin.flush()
        except OSError as exc:
            return ReloadResult(version.number, version.weights, trigger, clock(), False, str(exc))
        answer = self._reply(360)
        ok = bool(answer.get("ok"))
        detail = "" if ok else str(answer.get("error"))
        return ReloadResult(version.number, version.weights, trigger, clock(), ok, detail, answer)

    def stop(self) -> None:
        if self._process is not None and self._process.stdin is not None:
            try:
                self._process.stdin.close()  # the driver shuts Serve and Ray down
                self._process.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        stop_group(self._process)
        self._process = None
        shutil.rmtree(self._temp, ignore_errors=True)
