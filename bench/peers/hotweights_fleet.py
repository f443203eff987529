"""The hotweights fleet as a benchmarked system: `hotweights fleet --repo R --replicas N` in
a subprocess (its own local Ray cluster on loopback), each new version published into the
repository with `hotweights publish`, the way an operator would; the coordinator's watcher
notices it and runs the two-phase cutover.

A version is live at its commit (the ingress's flip: every request admitted after it is
stamped with the new generation); the reload's `server` is the coordinator's record of
the cutover (prepare, commit, drain and finish times, each replica's prepare time),
with `duration_s` the server's own cutover time: prepare plus commit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from peers.hotweights_server import (
    GENERATION_HEADER,
    MODEL_NAME,
    PublishTrigger,
    completion_request,
)
from peers.procs import free_port, spawn, stop_group, wait_http
from peers.system import Clock, ModelVersion, PeerUnavailable, ReloadResult, Request, Workload

_CLI = (sys.executable, "-m", "hotweights.cli")
CUTOVER_TIMEOUT_S = 300.0


class FleetSystem:
    """`hotweights fleet` with `replicas` replicas, versions published into `repo`."""

    def __init__(
        self,
        repo: Path,
        logs: Path,
        replicas: int = 2,
        start_timeout: float = 300.0,
        prepare_parallel: int = 0,
        fleet_state: str = "repo",
    ) -> None:
        at_once = f", {prepare_parallel} preparing at once" if prepare_parallel else ""
        state = f", record in {fleet_state}" if fleet_state != "repo" else ""
        self.name = f"hotweights-fleet ({replicas} replicas{at_once}{state})"
        self.replicas = replicas
        self.prepare_parallel = prepare_parallel
        self.fleet_state = fleet_state
        self.repo = repo
        self.log = logs / "hotweights-fleet.log"
        self.publisher = PublishTrigger(repo, logs / "publish-fleet.log")
        self.start_timeout = start_timeout
        self.base_url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._admin: httpx.Client | None = None
        self._versions: dict[int, int] = {}  # generation -> ModelVersion.number

    def install(self) -> None:
        """Nothing to install: the project's environment has the ray extra."""

    def start(self, first: ModelVersion) -> None:
        shutil.rmtree(self.repo, ignore_errors=True)  # the benchmark's own, from a run before
        error = self.publisher._publish(first)
        if error:
            raise PeerUnavailable("start", error)
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        command: list[str | Path] = [
            *_CLI,
            "fleet",
            "--repo",
            self.repo,
            "--model",
            MODEL_NAME,
            "--replicas",
            str(self.replicas),
            "--port",
            str(port),
            "--watch",
            "events",
            "--prepare-parallel",
            str(self.prepare_parallel),
            "--fleet-state",
            self.fleet_state,
        ]
        self._process = spawn(command, self.log, env={"RAY_USAGE_STATS_ENABLED": "0"})
        wait_http(
            f"{self.base_url}/ready",
            timeout=self.start_timeout,
            process=self._process,
            log=self.log,
        )
        self._admin = httpx.Client(base_url=self.base_url, timeout=60)
        status = self.status()
        self._versions = {int(status["committed"]["generation"]): first.number}

    def status(self) -> dict[str, Any]:
        if self._admin is None:
            raise PeerUnavailable("run", "not started")
        status: dict[str, Any] = self._admin.get("/admin/fleet").json()
        return status

    def server_pid(self) -> int:
        if self._process is None:
            raise PeerUnavailable("run", "not started")
        return self._process.pid

    def request(self, workload: Workload) -> Request:
        return completion_request(workload)

    def answer_label(self, headers: dict[str, str], body: Any) -> tuple[str, str]:
        return f"g{headers[GENERATION_HEADER]}", str(body["choices"][0]["text"])

    def version_of(self, label: str) -> int | None:
        return self._versions.get(int(label.removeprefix("g")))

    def reload(self, version: ModelVersion, clock: Clock) -> ReloadResult:
        trigger = clock()
        offset = time.time() - clock()  # wall clock minus run clock
        try:
            error = self.publisher._publish(version)
        except subprocess.TimeoutExpired:
            error = "hotweights publish took over 300 s"
        published = clock()
        if error:
            return ReloadResult(version.number, version.weights, trigger, published, False, error)
        deadline = time.monotonic() + CUTOVER_TIMEOUT_S
        while time.monotonic() < deadline:
            cutover = self._cutover_of(version.number)
            if cutover is not None:
                break
            time.sleep(0.05)
        else:
            detail = f"no cutover to version {version.number} within {CUTOVER_TIMEOUT_S:g} s"
            return ReloadResult(version.number, version.weights, trigger, clock(), False, detail)
        phases = cutover["phases"]
        committed_at = cutover["started_at"] + phases["prepare"] + phases.get("commit", 0.0)
        server = {
            **cutover,
            "publish_s": round(published - trigger, 4),
            "notice_s": round(cutover["started_at"] - offset - published, 4),
            "duration_s": round(phases["prepare"] + phases.get("commit", 0.0), 4),
        }
        if cutover["outcome"] != "committed":
            detail = f"{cutover['outcome']}: {cutover['error']}"
            return ReloadResult(version.number, version.weights, trigger, clock(), False, detail)
        self._versions[int(cutover["generation"])] = version.number
        done = cutover["started_at"] + sum(phases.values()) - offset
        live = committed_at - offset
        return ReloadResult(version.number, version.weights, trigger, live, True, "", server, done)

    def _cutover_of(self, number: int, *, committed: bool = False) -> dict[str, Any] | None:
        """The finished cutover to repository version `number`, if there is one yet (with
        `committed`, only a committed one: an abort may be followed by a retry)."""
        for cutover in self.status()["cutovers"]:
            if cutover["version"] != number:
                continue
            if cutover["outcome"] == "committed" and "finish" in cutover["phases"]:
                return dict(cutover)
            if cutover["outcome"] in ("aborted", "skipped") and not committed:
                return dict(cutover)
        return None

    def publish(self, version: ModelVersion) -> str | None:
        """Publish `version` into the repository; the error, if it failed."""
        return self.publisher._publish(version)

    def kill_coordinator(self, *, preparing: bool = False) -> tuple[int, str]:
        """SIGKILL the coordinator's process (with `preparing`, once a cutover prepares,
        polled); how often Ray had restarted it, and the phase its record was in when it
        died (`idle`, `preparing` or `committed`; with the record in Ray's KV, which this
        driver does not read, the phase `/admin/fleet` showed just before the kill)."""
        deadline = time.monotonic() + CUTOVER_TIMEOUT_S
        status = self.status()
        while preparing and status["preparing"] is None:
            if time.monotonic() > deadline:
                raise PeerUnavailable("run", "no cutover began preparing")
            time.sleep(0.02)
            status = self.status()
        os.kill(int(status["coordinator"]["pid"]), signal.SIGKILL)
        if self.fleet_state != "repo":
            shown = (
                "preparing" if status["preparing"] else "draining" if status["draining"] else "idle"
            )
            return int(status["coordinator"]["restarts"]), f"{shown} (shown)"
        record = json.loads((self.repo / ".hotweights-fleet.json").read_text())
        pending = record["models"][MODEL_NAME]["pending"]
        return int(status["coordinator"]["restarts"]), pending["phase"] if pending else "idle"

    def restarted(self, restarts: int) -> bool:
        """Whether Ray has restarted the coordinator since it had `restarts` restarts."""
        return int(self.status()["coordinator"]["restarts"]) > restarts

    def live(self, number: int) -> bool:
        """Whether a cutover to repository version `number` committed and finished."""
        cutover = self._cutover_of(number, committed=True)
        if cutover is not None:
            self._versions[int(cutover["generation"])] = number
        return cutover is not None

    def kill_replica(self) -> str:
        """SIGKILL one replica's process (a crash, not a graceful stop); its id."""
        victim = self.status()["replicas"][0]
        os.kill(int(victim["pid"]), signal.SIGKILL)
        return str(victim["replica"])

    def recovered(self, victim: str) -> bool:
        """Whether the fleet again runs all its replicas, `victim` replaced, each live on
        the committed generation."""
        status = self.status()
        replicas = [r for r in status["replicas"] if "replica" in r]
        committed = status["committed"]["generation"]
        return (
            len(replicas) == self.replicas
            and victim not in {r["replica"] for r in replicas}
            and all(r["live"] == committed for r in replicas)
        )

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        stop_group(self._process, timeout=60)
        self._process = None
