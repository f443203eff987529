"""Ray Serve driver, run with the Ray environment's python: starts a local Ray cluster on
loopback (no dashboard), deploys the application `ray_app:app` (one replica of `Bench`)
from a config, then applies each JSON line read from stdin as the deployment's new
`user_config` (`{"path", "version"}`). A config deploy whose only change is `user_config`
is Serve's lightweight update: the running replica's `reconfigure` loads the new weights
in place. This is the controller call `serve deploy` makes through the dashboard's REST
API; calling it from the driver spares the dashboard. Replies on stdout, one line per
command, prefixed `BENCH `.

    python ray_app.py PORT TEMP_DIR '{"path": ..., "version": 1}'
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import ray  # type: ignore[import-not-found]
from ray import serve


class Bench:
    def __init__(self) -> None:
        self.generator: Any = None

    def reconfigure(self, config: dict[str, Any]) -> None:
        from textgen import Generator  # type: ignore[import-not-found]  # on PYTHONPATH

        self.generator = Generator(str(config["path"]), str(config["version"]))

    async def __call__(self, request: Any) -> dict[str, Any]:
        from textgen import parse

        prompt, max_tokens = parse(await request.json())
        answer: dict[str, Any] = self.generator.generate(prompt, max_tokens)
        return answer


# One replica that never asks Ray for a whole CPU (the machine has two, Ray keeps some).
deployment: Any = serve.deployment(
    num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0}
)(Bench)
app = deployment.bind()


def reply(message: dict[str, Any]) -> None:
    print("BENCH " + json.dumps(message), flush=True)


def deploy(client: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Apply `config` as the deployment's user_config; return once Serve reports the
    deployment updated and healthy again."""
    from ray.serve.schema import ServeDeploySchema  # type: ignore[import-not-found]

    schema = ServeDeploySchema.model_validate(
        {
            "applications": [
                {
                    "name": "bench",
                    "route_prefix": "/bench",
                    "import_path": "ray_app:app",
                    "deployments": [{"name": "Bench", "user_config": config}],
                }
            ]
        }
    )
    started = time.monotonic()
    client.deploy_apps(schema)
    saw_updating = False
    while time.monotonic() - started < 300:
        application = serve.status().applications.get("bench")
        deployment_status = application.deployments.get("Bench") if application else None
        state = deployment_status.status if deployment_status else None
        saw_updating = saw_updating or state == "UPDATING"
        # A lightweight update may finish before the first poll sees UPDATING.
        if state == "HEALTHY" and (saw_updating or time.monotonic() - started > 2.0):
            return {"seconds": time.monotonic() - started, "saw_updating": saw_updating}
        time.sleep(0.02)
    raise TimeoutError(f"deployment not healthy 300 s after the update (last: {state})")


def main() -> None:
    port, temp_dir, first = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    ray.init(
        address="local",
        include_dashboard=False,
        num_cpus=2,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    from ray.serve.context import _get_global_client  # type: ignore[import-not-found]

    client = _get_global_client()
    deploy(client, first)
    reply({"ready": True})
    for line in sys.stdin:
        try:
            reply({"ok": True, **deploy(client, json.loads(line))})
        except Exception as exc:
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
