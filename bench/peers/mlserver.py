"""Seldon MLServer 1.7.1 as a benchmarked system.

One model, `bench`, in a model repository directory: a model-settings.json naming the
custom runtime (`handlers/mlserver_runtime.py`) and the weights directory. A reload is
MLServer's in-place reload: rewrite model-settings.json for the new version, then
`POST /v2/repository/models/bench/load`, which loads the new model before unloading the
old one and answers once it is loaded. One parallel inference worker (MLServer's default).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx

from peers.procs import InstalledPeer, free_port, spawn, stop_group, wait_http
from peers.system import Clock, ModelVersion, PeerUnavailable, ReloadResult, Request, Workload

HANDLERS = Path(__file__).resolve().parent / "handlers"
MODEL = "bench"
# uvloop after 0.21 crashes MLServer 1.7's parallel workers.
REQUIREMENTS = (
    ("torch==2.13.0",),
    ("mlserver==1.7.1", "uvloop==0.21.0", "transformers", "safetensors"),
)


class MLServerSystem(InstalledPeer):
    name = "mlserver"
    requirements = REQUIREMENTS
    log_name = "mlserver.log"

    def __init__(
        self, cache: Path, workdir: Path, install_timeout: float, start_timeout: float
    ) -> None:
        super().__init__(cache, workdir, install_timeout, start_timeout)
        self.repository = workdir / "repository"
        self.model_dir = self.repository / MODEL
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, first: ModelVersion) -> None:
        self.model_dir.mkdir(parents=True, exist_ok=True)
        for name in ("mlserver_runtime.py", "textgen.py"):
            shutil.copy(HANDLERS / name, self.model_dir / name)
        self._write_settings(first)
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        settings = {
            "host": "127.0.0.1",
            "http_port": port,
            "grpc_port": free_port(),
            "metrics_port": free_port(),
            "parallel_workers": 1,
            "load_models_at_startup": True,
        }
        (self.repository / "settings.json").write_text(json.dumps(settings))
        command: list[str | Path] = [self.venv / "bin" / "mlserver", "start", self.repository]
        self._process = spawn(command, self.log, cwd=self.repository)
        wait_http(
            f"{self.base_url}/v2/models/{MODEL}/ready",
            timeout=self.start_timeout,
            process=self._process,
            log=self.log,
        )

    def _write_settings(self, version: ModelVersion) -> None:
        settings = {
            "name": MODEL,
            "implementation": "mlserver_runtime.BenchRuntime",
            "parameters": {
                "uri": str(version.path),
                "extra": {"bench_version": str(version.number)},
            },
        }
        path = self.model_dir / "model-settings.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(settings))
        temporary.replace(path)

    def server_pid(self) -> int:
        if self._process is None:
            raise PeerUnavailable("run", "not started")
        return self._process.pid

    def request(self, workload: Workload) -> Request:
        body = {
            "inputs": [
                {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": [workload.prompt]},
                {
                    "name": "max_tokens",
                    "shape": [1],
                    "datatype": "INT32",
                    "data": [workload.max_tokens],
                },
            ]
        }
        return Request(f"/v2/models/{MODEL}/infer", body)

    def answer_label(self, headers: dict[str, str], body: Any) -> tuple[str, str]:
        outputs = {item["name"]: item["data"][0] for item in body["outputs"]}
        return str(outputs["version"]), str(outputs["text"])

    def version_of(self, label: str) -> int | None:
        return int(label)

    def reload(self, version: ModelVersion, clock: Clock) -> ReloadResult:
        trigger = clock()
        try:
            self._write_settings(version)
            response = httpx.post(f"{self.base_url}/v2/repository/models/{MODEL}/load", timeout=300)
            ok = response.is_success
            detail = "" if ok else f"{response.status_code}: {response.text[:300]}"
        except httpx.HTTPError as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        return ReloadResult(version.number, version.weights, trigger, clock(), ok, detail)

    def stop(self) -> None:
        stop_group(self._process)
        self._process = None
