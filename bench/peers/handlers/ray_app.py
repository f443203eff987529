"""Ray Serve driver, run with the Ray environment's python: starts a local Ray cluster on
loopback (no dashboard), deploys one application (`bench`, deployment `Bench`) from a
config, then deploys each JSON line read from stdin (`{"path", "version"}`) as the next
version, in one of two ways:

- `reconfigure`: one replica; the version is the deployment's `user_config`. A config
  deploy whose only change is `user_config` is Serve's lightweight update: the running
  replica's `reconfigure` loads the new weights in place; no replica starts or stops.
- `rolling`: two replicas; the version is the application's `args`, which the application
  builder `rolling` passes to the replicas' constructor. `args` are part of the code
  version Serve derives from a config (`get_app_code_version`), so a new version rebuilds
  the application and rolls the deployment: with `max_surge_percent=50` Serve starts one
  replica of the new version at a time and stops an old one (gracefully: it finishes the
  requests it holds) only once that replacement is running, so two replicas always serve.

Deploying is the controller call `serve deploy` makes through the dashboard's REST API;
calling it from the driver spares the dashboard. A deploy is answered once Serve reports
it finished: for `rolling`, every replica is one started for the new version and RUNNING,
none of the old ones is left, and the deployment is HEALTHY. Replies on stdout, one line
per command, prefixed `BENCH `.

    python ray_app.py reconfigure|rolling PORT TEMP_DIR '{"path": ..., "version": 1}'
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import ray
from ray import serve

APP = "bench"
DEPLOYMENT = "Bench"
TIMEOUT_S = 300.0


class Bench:
    """One replica: serves the version it was constructed with (`rolling`) or the one its
    last `reconfigure` loaded (`reconfigure`)."""

    def __init__(self, path: str | None = None, version: int | None = None) -> None:
        self.generator: Any = None
        if path is not None:
            self.generator = _generator(path, version)

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.generator = _generator(str(config["path"]), config["version"])

    async def __call__(self, request: Any) -> dict[str, Any]:
        from textgen import parse  # type: ignore[import-not-found]  # on PYTHONPATH

        prompt, max_tokens = parse(await request.json())
        answer: dict[str, Any] = self.generator.generate(prompt, max_tokens)
        return answer


def _generator(path: str, version: Any) -> Any:
    from textgen import Generator

    return Generator(path, str(version))


# Replicas never ask Ray for a whole CPU (the machine has two, Ray keeps some).
_OPTIONS: dict[str, Any] = {
    "name": DEPLOYMENT,
    "max_ongoing_requests": 64,
    "ray_actor_options": {"num_cpus": 0},
}
in_place: Any = serve.deployment(num_replicas=1, **_OPTIONS)(Bench).bind()


def rolling(args: dict[str, Any]) -> Any:
    """Application builder of the `rolling` mode: `args` is the application config's
    `args` (`{"path", "version"}`), passed on to every replica's constructor."""
    deployment = serve.deployment(num_replicas=2, max_surge_percent=50, **_OPTIONS)(Bench)
    return deployment.bind(str(args["path"]), int(args["version"]))


def reply(message: dict[str, Any]) -> None:
    print("BENCH " + json.dumps(message), flush=True)


def application(mode: str, version: dict[str, Any]) -> dict[str, Any]:
    """The application config that makes `version` the deployed one."""
    base = {"name": APP, "route_prefix": "/bench"}
    if mode == "rolling":
        return base | {"import_path": "ray_app:rolling", "args": version}
    return base | {
        "import_path": "ray_app:in_place",
        "deployments": [{"name": DEPLOYMENT, "user_config": version}],
    }


def deploy(client: Any, mode: str, version: dict[str, Any]) -> dict[str, Any]:
    """Deploy `version`; return once Serve reports the update finished."""
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate({"applications": [application(mode, version)]})
    before = {r["replica_id"] for r in _deployment(client).get("replicas", [])}
    started = time.monotonic()
    client.deploy_apps(schema)
    if mode == "rolling":
        return _wait_rolled(client, before, started)
    return _wait_reconfigured(started)


def _deployment(client: Any) -> dict[str, Any]:
    """The deployment's details as the controller reports them ({} before the first
    deploy): status, target_num_replicas, replicas (replica_id, state)."""
    application: dict[str, Any] = client.get_serve_details().get("applications", {}).get(APP, {})
    details: dict[str, Any] = application.get("deployments", {}).get(DEPLOYMENT, {})
    return details | {"app_status": application.get("status")}


def _wait_reconfigured(started: float) -> dict[str, Any]:
    saw_updating = False
    state = None
    while time.monotonic() - started < TIMEOUT_S:
        application = serve.status().applications.get(APP)
        deployment_status = application.deployments.get(DEPLOYMENT) if application else None
        state = deployment_status.status if deployment_status else None
        saw_updating = saw_updating or state == "UPDATING"
        # A lightweight update may finish before the first poll sees UPDATING.
        if state == "HEALTHY" and (saw_updating or time.monotonic() - started > 2.0):
            return {"seconds": time.monotonic() - started, "saw_updating": saw_updating}
        time.sleep(0.02)
    raise TimeoutError(f"deployment not healthy {TIMEOUT_S:.0f} s after the update (last: {state})")


def _wait_rolled(client: Any, before: set[str], started: float) -> dict[str, Any]:
    """Poll the controller until every replica is a new one, RUNNING, as many as the
    target, and the deployment HEALTHY; report when the first new replica ran."""
    first_new_running: float | None = None
    details: dict[str, Any] = {}
    while time.monotonic() - started < TIMEOUT_S:
        details = _deployment(client)
        replicas = details.get("replicas", [])
        new_running = [
            r for r in replicas if r["replica_id"] not in before and r["state"] == "RUNNING"
        ]
        if new_running and first_new_running is None:
            first_new_running = time.monotonic() - started
        if (
            details.get("status") == "HEALTHY"
            and details.get("app_status") == "RUNNING"
            and len(new_running) == len(replicas) == details.get("target_num_replicas")
        ):
            return {
                "seconds": time.monotonic() - started,
                "first_new_replica_running_s": first_new_running,
                "replicas": len(replicas),
            }
        time.sleep(0.05)
    states = [(r["replica_id"][-6:], r["state"]) for r in details.get("replicas", [])]
    raise TimeoutError(
        f"rollout not finished {TIMEOUT_S:.0f} s after the deploy (deployment "
        f"{details.get('status')}, application {details.get('app_status')}, replicas {states})"
    )


def main() -> None:
    mode, port, temp_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    first = json.loads(sys.argv[4])
    ray.init(
        address="local",
        include_dashboard=False,
        num_cpus=2,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    deploy(client, mode, first)
    reply({"ready": True})
    for line in sys.stdin:
        try:
            reply({"ok": True, **deploy(client, mode, json.loads(line))})
        except Exception as exc:
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
