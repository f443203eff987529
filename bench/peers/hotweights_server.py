"""hotweights as a benchmarked system: `hotweights serve` in a subprocess, reloads through
one swappable trigger.

Two triggers, one role (`ReloadTrigger`): `PublishTrigger` (the default) serves a model
repository (`hotweights serve --repo`) and makes each version live the way an operator
would, with `hotweights publish` (an atomic copy into the repository; the server's
watcher notices it and reloads); `AdminTrigger` serves a directory and calls
`POST /admin/reload {"path": ...}`.

Rows (`HOTWEIGHTS_ROWS`): one per swap policy, with the server's defaults (requests are
batched, up to 32 sequences stepped together), and a control row, `availability/batch1`:
the availability policy with `--max-batch-size 1`, so the server generates for one
request at a time, as every peer does (one worker, or one replica, serving one request
after another). It controls for batching: next to the `availability` row it shows how
much of the latency under reloads comes from serving several requests at once rather
than from the reload mechanism.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from peers.procs import free_port, spawn, stop_group, tree_rss, wait_http
from peers.system import Clock, ModelVersion, PeerUnavailable, ReloadResult, Request, Workload

MODEL_NAME = "bench"
GENERATION_HEADER = "x-hotweights-generation"
TRIGGERS = ("publish", "admin")
_FINGERPRINT = re.compile(r"^hw-g(\d+)-[0-9a-f]+$")
_CLI = (sys.executable, "-m", "hotweights.cli")


def completion_request(workload: Workload) -> Request:
    """The benchmark's request to a hotweights server or fleet: a greedy completion."""
    return Request(
        "/v1/completions",
        {
            "model": MODEL_NAME,
            "prompt": workload.prompt,
            "max_tokens": workload.max_tokens,
            "temperature": 0,
        },
    )


class ReloadTrigger(Protocol):
    """How the server is pointed at version 1, and how a later version is made live."""

    def serve_args(self, first: ModelVersion) -> list[str | Path]:
        """Arguments of `hotweights serve` that serve `first` (preparing what they need)."""
        ...

    def make_live(self, admin: httpx.Client, version: ModelVersion, clock: Clock) -> ReloadResult:
        """Make `version` live and block until it is live or failed; never raises."""
        ...


class AdminTrigger:
    """Serve a directory; reload with `POST /admin/reload` and the version's directory."""

    def __init__(self, model_root: Path) -> None:
        self.model_root = model_root

    def serve_args(self, first: ModelVersion) -> list[str | Path]:
        return [first.path, "--name", MODEL_NAME, "--model-root", self.model_root]

    def make_live(self, admin: httpx.Client, version: ModelVersion, clock: Clock) -> ReloadResult:
        trigger = clock()
        try:
            response = admin.post(
                "/admin/reload",
                json={"path": str(version.path), "description": f"bench version {version.number}"},
                timeout=300,
            )
        except httpx.HTTPError as exc:
            detail = f"{type(exc).__name__}: {exc}"
            return ReloadResult(version.number, version.weights, trigger, clock(), False, detail)
        live = clock()
        event: Any = response.json() if response.content else {}
        ok = response.is_success
        detail = "" if ok else f"{response.status_code}: {response.text[:300]}"
        return ReloadResult(version.number, version.weights, trigger, live, ok, detail, event)


class PushTrigger:
    """Serve a directory; make each version live with `hotweights.push` from another
    process (`peers/pusher.py`, which loads the weights untimed first): the trainer's path,
    over a socket or handed over in shared memory. Live is when `push` returned."""

    def __init__(self, model_root: Path, handover: str) -> None:
        self.model_root = model_root
        self.handover = handover

    def serve_args(self, first: ModelVersion) -> list[str | Path]:
        return [first.path, "--name", MODEL_NAME, "--model-root", self.model_root]

    def make_live(self, admin: httpx.Client, version: ModelVersion, clock: Clock) -> ReloadResult:
        script = Path(__file__).resolve().parent / "pusher.py"
        url = str(admin.base_url).rstrip("/")
        args = [sys.executable, str(script), str(version.path), url, MODEL_NAME, self.handover]
        with subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        ) as pusher:
            if pusher.stdin is None or pusher.stdout is None:  # pragma: no cover - piped above
                raise RuntimeError("the pusher's pipes are missing")
            ready = pusher.stdout.readline().strip()
            trigger = clock()
            if ready != "ready":
                return ReloadResult(version.number, version.weights, trigger, clock(), False,
                                    f"pusher did not start: {ready!r}")  # fmt: skip
            pusher.stdin.write("go\n")
            pusher.stdin.flush()
            answer = pusher.stdout.readline()
            live = clock()
        try:
            result: Any = json.loads(answer)
        except ValueError:
            result = {"ok": False, "error": f"pusher said {answer!r}"}
        if not result.get("ok"):
            detail = str(result.get("error"))[:300]
            return ReloadResult(version.number, version.weights, trigger, live, False, detail)
        event = result["event"]
        event["client_s"] = result["seconds"]
        return ReloadResult(version.number, version.weights, trigger, live, True, "", event)


class PublishTrigger:
    """Serve a repository; publish each version into it with `hotweights publish` and wait
    for the reload the watcher starts. Live is the server's own `ended_at` of that reload;
    the time spent publishing and noticing is recorded apart (`publish_s`, `notice_s`)."""

    def __init__(self, repo: Path, log: Path, mode: str = "copy") -> None:
        self.repo = repo
        self.log = log
        self.mode = mode
        """`copy`, `link` or `move`: how `hotweights publish` takes the checkpoint."""

    def serve_args(self, first: ModelVersion) -> list[str | Path]:
        error = self._publish(first)
        if error:
            raise PeerUnavailable("start", error)
        return ["--repo", self.repo, "--watch", "events"]

    def _publish(self, version: ModelVersion) -> str:
        command = [
            *_CLI,
            "publish",
            str(version.path),
            "--repo",
            str(self.repo),
            "--model",
            MODEL_NAME,
            "--version",
            str(version.number),
            "--description",
            f"bench version {version.number}",
            *([f"--{self.mode}"] if self.mode != "copy" else []),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            return f"hotweights publish exited {done.returncode}: {done.stderr.strip()[-300:]}"
        return ""

    def target(self, version: ModelVersion) -> Path:
        return self.repo / MODEL_NAME / str(version.number)

    def make_live(self, admin: httpx.Client, version: ModelVersion, clock: Clock) -> ReloadResult:
        trigger = clock()
        offset = time.time() - clock()  # wall clock minus run clock
        try:
            error = self._publish(version)
        except subprocess.TimeoutExpired:
            error = "hotweights publish took over 300 s"
        published = clock()
        if error:
            return ReloadResult(version.number, version.weights, trigger, published, False, error)
        target = str(self.target(version))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                events = admin.get("/admin/reloads", params={"limit": 20}).json()["events"]
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                detail = f"reading the reload log: {exc}"
                return ReloadResult(
                    version.number, version.weights, trigger, clock(), False, detail
                )
            event = next((e for e in events if e.get("target") == target), None)
            if event is not None:
                break
            time.sleep(0.05)
        else:
            detail = f"no reload of {target} within 300 s of publishing it"
            return ReloadResult(version.number, version.weights, trigger, clock(), False, detail)
        event = {
            **event,
            "publish_s": round(published - trigger, 4),
            "notice_s": round(event["started_at"] - offset - published, 4),
        }
        ok = event["outcome"] == "live"
        live = event["ended_at"] - offset
        detail = "" if ok else f"{event['outcome']}: {event.get('error_message')}"
        return ReloadResult(version.number, version.weights, trigger, live, ok, detail, event)

    def prune(self, keep_from: int) -> None:
        """Delete published versions below `keep_from` (retired ones), to bound the disk a
        long soak takes; the repository drops vanished versions."""
        import shutil

        for path in (self.repo / MODEL_NAME).iterdir():
            if path.name.isdigit() and int(path.name) < keep_from:
                shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class HotweightsRow:
    """One hotweights row of the report: a swap policy and how many requests the server
    generates for at once."""

    policy: str
    max_batch_size: int | None = None
    """`--max-batch-size`; None: the server's default."""

    @property
    def name(self) -> str:
        """`availability`, or `availability/batch1` for a control row."""
        batch = "" if self.max_batch_size is None else f"/batch{self.max_batch_size}"
        return self.policy + batch

    @property
    def control(self) -> bool:
        """A control row runs under load only: no soak, no targets."""
        return self.max_batch_size is not None


HOTWEIGHTS_ROWS = {
    row.name: row
    for row in (
        HotweightsRow("availability"),
        HotweightsRow("resource"),
        HotweightsRow("availability", max_batch_size=1),
    )
}


class HotweightsSystem:
    """`python -m hotweights.cli serve ... --policy P` on a free loopback port."""

    def __init__(
        self,
        policy: str,
        trigger: ReloadTrigger,
        logs: Path,
        start_timeout: float = 120.0,
        *,
        max_batch_size: int | None = None,
        device: str | None = None,
    ) -> None:
        self.policy = policy
        self.row = HotweightsRow(policy, max_batch_size)
        self.name = f"hotweights/{self.row.name}"
        self.log = logs / f"hotweights-{self.row.name.replace('/', '-')}.log"
        self.trigger = trigger
        self.device = device
        self.start_timeout = start_timeout
        self.base_url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._admin: httpx.Client | None = None
        self._versions: dict[int, int] = {}  # generation -> ModelVersion.number
        self.serving: dict[str, Any] = {}
        """The server's own account, once started: its config (policy, max_batch_size,
        ...) and how the first version generates (batched, with how many rows)."""

    def install(self) -> None:
        """Nothing to install: the project's own environment runs it."""

    def start(self, first: ModelVersion) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        command: list[str | Path] = [
            *_CLI,
            "serve",
            *self.trigger.serve_args(first),
            "--port",
            str(port),
            "--policy",
            self.policy,
        ]
        if self.row.max_batch_size is not None:
            command += ["--max-batch-size", str(self.row.max_batch_size)]
        if self.device is not None:
            command += ["--device", self.device]
        self._process = spawn(command, self.log)
        wait_http(
            f"{self.base_url}/ready",
            timeout=self.start_timeout,
            process=self._process,
            log=self.log,
        )
        self._admin = httpx.Client(base_url=self.base_url, timeout=60)
        status = self._admin.get("/admin/status").json()
        generation = status["models"][MODEL_NAME]["generation"]
        self._versions = {int(generation): first.number}
        engines = status["models"][MODEL_NAME].get("engines", {})
        self.serving = {"config": status["config"], "engine": engines.get(str(generation))}

    def server_pid(self) -> int:
        if self._process is None:
            raise PeerUnavailable("run", "not started")
        return self._process.pid

    def request(self, workload: Workload) -> Request:
        return completion_request(workload)

    def answer_label(self, headers: dict[str, str], body: Any) -> tuple[str, str]:
        match = _FINGERPRINT.match(str(body.get("system_fingerprint", "")))
        header = headers.get(GENERATION_HEADER)
        if match is None or header != match.group(1):
            raise ValueError(
                f"generation unclear: header {header!r}, fingerprint "
                f"{body.get('system_fingerprint')!r}"
            )
        return f"g{header}", str(body["choices"][0]["text"])

    def version_of(self, label: str) -> int | None:
        return self._versions.get(int(label.removeprefix("g")))

    def reload(self, version: ModelVersion, clock: Clock) -> ReloadResult:
        if self._admin is None:
            raise PeerUnavailable("run", "not started")
        result = self.trigger.make_live(self._admin, version, clock)
        if result.ok:
            self._versions[int(result.server["new_generation"])] = version.number
        return result

    def settled(self, timeout: float = 60.0) -> bool:
        """Wait until only the live version is resident (the old one drained and
        unloaded); True if it happened within `timeout`."""
        if self._admin is None:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self._admin.get("/admin/status").json()["models"][MODEL_NAME]
            if len(status["resident"]) == 1 and status["reloading"] is None:
                return True
            time.sleep(0.02)
        return False

    def rss(self) -> int:
        return tree_rss(self.server_pid())

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        stop_group(self._process)
        self._process = None
