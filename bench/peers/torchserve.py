"""TorchServe 0.12 as a benchmarked system.

Each version is its own model archive (`bench-vN.mar`: the handler, the shared generation
code and a model-config.yaml naming the weights directory; the weights are not copied).
A reload is TorchServe's documented version switch through the management API: register
the new archive as a new version of model `bench` with one worker (synchronous: it
returns once the worker has loaded it), `set-default` to it (live from here: new requests
go to it), wait until the old version has drained, then unregister it.

Drained is what TorchServe itself reports: a customized describe of the old version
(`GET /models/bench/OLD?customized=true`) is a job in that version's own queue, which its
one worker takes in order, one at a time; its answer (the handler's, naming the version)
comes back only once every request queued before it was answered. Then a plain describe
must show no request left in the queue (`jobQueueStatus.pendingRequests`), else another
round. Unregistering at once, as before, stopped the old worker under the requests routed
to it just before the switch (`500 Worker died`, timeouts).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from peers.procs import (
    InstalledPeer,
    free_port,
    run_step,
    spawn,
    stop_group,
    wait_http,
)
from peers.system import Clock, ModelVersion, PeerUnavailable, ReloadResult, Request, Workload

HANDLERS = Path(__file__).resolve().parent / "handlers"
MODEL = "bench"
DRAIN_TIMEOUT_S = 120.0
REQUIREMENTS = (
    ("torch==2.13.0",),
    ("torchserve==0.12.0", "torch-model-archiver==0.12.0", "pyyaml", "transformers", "safetensors"),
)


class TorchServeSystem(InstalledPeer):
    name = "torchserve"
    requirements = REQUIREMENTS
    log_name = "torchserve.log"

    def __init__(
        self, cache: Path, workdir: Path, install_timeout: float, start_timeout: float
    ) -> None:
        super().__init__(cache, workdir, install_timeout, start_timeout)
        self.store = workdir / "model-store"
        self._management = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._live: int | None = None

    def install(self) -> None:
        if shutil.which("java") is None:
            raise PeerUnavailable("install", "TorchServe needs Java 17 (`java` is not on PATH)")
        super().install()

    def start(self, first: ModelVersion) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        ports = [free_port() for _ in range(3)]
        self.base_url = f"http://127.0.0.1:{ports[0]}"
        self._management = f"http://127.0.0.1:{ports[1]}"
        config = self.workdir / "config.properties"
        config.write_text(
            "\n".join(
                [
                    f"inference_address={self.base_url}",
                    f"management_address={self._management}",
                    f"metrics_address=http://127.0.0.1:{ports[2]}",
                    f"model_store={self.store}",
                    "disable_token_authorization=true",
                    "enable_model_api=true",
                    "default_workers_per_model=1",
                    "install_py_dep_per_model=false",
                    "default_response_timeout=120",
                    "job_queue_size=1000",
                    "disable_system_metrics=true",
                ]
            )
            + "\n"
        )
        env = {
            "PATH": f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "LOG_LOCATION": str(self.workdir / "logs"),
            "METRICS_LOCATION": str(self.workdir / "logs"),
        }
        command: list[str | Path] = [
            self.venv / "bin" / "torchserve",
            "--start",
            "--foreground",
            "--ncs",
            "--disable-token-auth",
            "--ts-config",
            config,
            "--model-store",
            self.store,
        ]
        self._process = spawn(command, self.log, env=env, cwd=self.workdir)
        wait_http(
            f"{self.base_url}/ping", timeout=self.start_timeout, process=self._process, log=self.log
        )
        self._archive(first)
        with httpx.Client(base_url=self._management, timeout=self.start_timeout) as client:
            error = self._register(client, first)
        if error:
            raise PeerUnavailable("start", error)
        self._live = first.number

    def _archive(self, version: ModelVersion) -> None:
        build = self.workdir / f"build-v{version.number}"
        build.mkdir(parents=True, exist_ok=True)
        config = build / "model-config.yaml"
        config.write_text(
            "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 1\nresponseTimeout: 120\n"
            f"handler:\n  model_dir: {json.dumps(str(version.path))}\n"
            f"  version: {json.dumps(str(version.number))}\n"
        )
        run_step(
            [
                self.venv / "bin" / "torch-model-archiver",
                "--model-name",
                f"{MODEL}-v{version.number}",
                "--version",
                str(version.number),
                "--handler",
                HANDLERS / "torchserve_handler.py",
                "--extra-files",
                HANDLERS / "textgen.py",
                "--config-file",
                config,
                "--export-path",
                self.store,
                "--force",
            ],
            self.workdir / "archiver.log",
            timeout=120,
            stage="run",
        )

    def _register(self, client: httpx.Client, version: ModelVersion) -> str:
        response = client.post(
            "/models",
            params={
                "url": f"{MODEL}-v{version.number}.mar",
                "model_name": MODEL,
                "initial_workers": 1,
                "synchronous": "true",
            },
        )
        return "" if response.is_success else f"register: {response.status_code} {response.text}"

    def server_pid(self) -> int:
        if self._process is None:
            raise PeerUnavailable("run", "not started")
        return self._process.pid

    def request(self, workload: Workload) -> Request:
        body = {"prompt": workload.prompt, "max_tokens": workload.max_tokens}
        return Request(f"/predictions/{MODEL}", body)

    def answer_label(self, headers: dict[str, str], body: Any) -> tuple[str, str]:
        return str(body["version"]), str(body["text"])

    def version_of(self, label: str) -> int | None:
        return int(label)

    def reload(self, version: ModelVersion, clock: Clock) -> ReloadResult:
        trigger = clock()
        old = self._live
        try:
            self._archive(version)
            with httpx.Client(base_url=self._management, timeout=300) as client:
                error = self._register(client, version)
                if error:
                    return ReloadResult(
                        version.number, version.weights, trigger, clock(), False, error
                    )
                switched = client.put(f"/models/{MODEL}/{version.number}/set-default")
                live = clock()
                if not switched.is_success:
                    detail = f"set-default: {switched.status_code} {switched.text}"
                    return ReloadResult(
                        version.number, version.weights, trigger, live, False, detail
                    )
                self._live = version.number
                drain = _drain(client, old)
                drained = clock()
                removed = client.delete(f"/models/{MODEL}/{old}")
                done = clock()
        except (httpx.HTTPError, PeerUnavailable) as exc:
            return ReloadResult(version.number, version.weights, trigger, clock(), False, str(exc))
        problems = [] if drain["drained"] else [f"old version {old} not drained: {drain['error']}"]
        if not removed.is_success:
            problems.append(f"unregister old: {removed.text[:200]}")
        server = {
            **drain,
            "drain_s": round(drained - live, 4),
            "unregistered_old_s": round(done - drained, 4),
        }
        return ReloadResult(
            version.number,
            version.weights,
            trigger,
            live,
            True,
            "; ".join(problems),
            server,
            done=done,
        )

    def stop(self) -> None:
        stop_group(self._process)
        self._process = None


def _drain(client: httpx.Client, old: int | None) -> dict[str, Any]:
    """Wait, up to `DRAIN_TIMEOUT_S`, until version `old` has answered every request it
    was given (see the module's docstring); say what TorchServe reported meanwhile."""
    queued_at_switch = _queued(client, old)
    report: dict[str, Any] = {"drained": False, "queued_at_switch": queued_at_switch}
    began = time.monotonic()
    rounds = 0
    while time.monotonic() - began < DRAIN_TIMEOUT_S:
        rounds += 1
        barrier = client.get(
            f"/models/{MODEL}/{old}", params={"customized": "true"}, timeout=DRAIN_TIMEOUT_S
        )
        if _customized_version(barrier) != str(old):
            error = f"customized describe: {barrier.status_code} {barrier.text[:200]}"
            return report | {"drain_rounds": rounds, "error": error}
        queued = _queued(client, old)
        if queued is None:
            return report | {"drain_rounds": rounds, "error": "describe failed"}
        if queued == 0:
            return report | {"drained": True, "drain_rounds": rounds}
    return report | {"drain_rounds": rounds, "error": f"still queued at {DRAIN_TIMEOUT_S:.0f} s"}


def _queued(client: httpx.Client, version: int | None) -> int | None:
    """Requests waiting in `version`'s queue (`jobQueueStatus.pendingRequests`); None when
    TorchServe does not say."""
    response = client.get(f"/models/{MODEL}/{version}")
    if not response.is_success:
        return None
    pending = (response.json()[0].get("jobQueueStatus") or {}).get("pendingRequests")
    return None if pending is None else int(pending)


def _customized_version(response: httpx.Response) -> str | None:
    """The version the handler named in a customized describe's answer."""
    if not response.is_success:
        return None
    metadata = response.json()[0].get("customizedMetadata")
    return str(metadata.get("version")) if isinstance(metadata, dict) else None
