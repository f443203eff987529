"""`hotweights fleet`: its arguments and what it runs. Imports no Ray until it runs (the
CLI builds its parser without the ray extra installed)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hotweights.backends.transformers_lm import DTYPES
from hotweights.config import Config
from hotweights.console import say
from hotweights.errors import HotweightsError
from hotweights.fleet.settings import FLEET_STATES
from hotweights.sources import VERIFY_MODES, WATCHER_KINDS

DemoRepository = Callable[[], tuple[Path, str]]
"""Builds (once) a repository to serve when `--repo` is not given; returns it and its
model's name. The CLI passes the demo's, so the fleet imports no demo."""

FLEET_SETTINGS = (
    "host",
    "port",
    "repo",
    "watch",
    "poll_interval",
    "verify",
    "settle_seconds",
    "drain_timeout",
    "admin_token",
    "api_key",
    "max_pending",
    "dtype",
    "device",
    "max_batch_size",
    "kv_cache_memory",
    "lora_base",
)


def add_fleet_command(
    commands: Any, device: Callable[[str], str], demo_repository: DemoRepository
) -> None:
    """Add `hotweights fleet` to the CLI's subcommands (`device` checks --device;
    `demo_repository` gives the repository to serve when none is named)."""
    fleet = commands.add_parser(
        "fleet",
        help="serve a repository's models from N replicas on Ray Serve; new versions go "
        "live on all of them at once (needs the ray extra)",
    )
    fleet.add_argument(
        "--repo", help="repository root, watched (default: a demo repository with version 1)"
    )
    fleet.add_argument(
        "--model",
        help="serve this base model of the repository and its LoRA adapters only "
        "(default: every base model and every adapter on them)",
    )
    fleet.add_argument(
        "--lora-base", help="the base of an adapter whose config names no model served"
    )
    fleet.add_argument("--replicas", type=int, default=2, help="replicas, each with its own copy")
    fleet.add_argument("--ray-address", help="join this Ray cluster (default: start one locally)")
    fleet.add_argument(
        "--replace",
        action="store_true",
        help="replace a fleet already running on the cluster (default: refuse to start)",
    )
    fleet.add_argument("--host", help="interface of the HTTP endpoint (default 127.0.0.1)")
    fleet.add_argument("--port", type=int, help="TCP port (default 8000)")
    fleet.add_argument(
        "--prepare-timeout",
        type=float,
        default=300.0,
        help="seconds every replica has to load a new version before the cutover aborts",
    )
    fleet.add_argument(
        "--prepare-parallel",
        type=int,
        default=0,
        help="replicas that prepare a new version at once; the others wait (0: all)",
    )
    fleet.add_argument(
        "--fleet-state",
        choices=FLEET_STATES,
        default="repo",
        help="where the coordinator keeps its record: beside the versions (repo) or in "
        "Ray's internal key-value store (ray-kv: the repository need not be writable)",
    )
    fleet.add_argument("--drain-timeout", type=float, help="seconds old requests may finish in")
    fleet.add_argument("--admin-token", help="bearer token for /admin (required beyond loopback)")
    fleet.add_argument("--api-key", help="bearer token required on /v1 endpoints")
    fleet.add_argument("--max-pending", type=int, help="requests per replica at once; then 429")
    fleet.add_argument("--dtype", choices=DTYPES)
    fleet.add_argument("--device", type=device, help="cpu (default), cuda or cuda:N")
    fleet.add_argument("--max-batch-size", type=int, help="sequences one engine steps together")
    fleet.add_argument("--kv-cache-memory", help="each engine's key/value cache (auto)")
    fleet.add_argument("--watch", choices=WATCHER_KINDS, help="file events, polling, or auto")
    fleet.add_argument("--poll-interval", type=float, help="seconds between scans when polling")
    fleet.add_argument("--verify", choices=VERIFY_MODES, help="check files against the manifest")
    fleet.add_argument("--settle-seconds", type=float, help="quiet time for manifest-less versions")
    fleet.set_defaults(run=_fleet, demo_repository=demo_repository)


def _fleet(args: argparse.Namespace) -> int:
    """`hotweights fleet`: start the fleet, serve until SIGINT or SIGTERM, stop it."""
    overrides = {key: getattr(args, key) for key in FLEET_SETTINGS}
    try:
        from hotweights.fleet.settings import FleetSettings

        model = args.model
        if args.repo is None:
            repo, model = args.demo_repository()
            overrides["repo"] = str(repo)
        config = Config.load(overrides)
        _check_models(config, model)
        settings = FleetSettings(
            config,
            model,
            replicas=args.replicas,
            prepare_timeout=args.prepare_timeout,
            prepare_parallel=args.prepare_parallel,
            ray_address=args.ray_address,
            replace=args.replace,
            fleet_state=args.fleet_state,
        )
        from hotweights.fleet import deployment
    except ImportError as exc:
        print(f"hotweights fleet needs Ray Serve: pip install 'hotweights[ray]' ({exc})")
        return 2
    except (ValueError, HotweightsError) as exc:
        print(f"hotweights fleet: {exc}", file=sys.stderr)
        return 2
    served = model or "every base model and its adapters"
    say(f"starting {settings.replicas} replicas of {served} from {config.repo} on Ray Serve")
    try:
        fleet = deployment.start(settings)
    except (ValueError, RuntimeError) as exc:  # FleetRunning is a RuntimeError
        print(f"hotweights fleet: {exc}", file=sys.stderr)
        return 1
    stop = _stop_on_signals()  # after the start: ray.init put in a SIGTERM handler that exits
    say(f"fleet serving {served} on {fleet.url} (GET /admin/fleet; Ctrl-C stops it)")
    try:
        stop.wait()
    finally:
        say("stopping the fleet")
        fleet.stop()
    return 0


def _check_models(config: Config, model: str | None) -> None:
    """Refuse, before Ray starts, a repository that cannot be read or has nothing to
    serve, and a `--model` that is not a base model there (`fleet_models`)."""
    from hotweights.fleet.fleet_models import fleet_models
    from hotweights.sources import ModelRepository

    if config.repo is None:  # pragma: no cover - set above
        return
    repository = ModelRepository(config.repo, verify="none")
    state = repository.scan()
    if not state.readable:
        raise ValueError(f"cannot read the model repository {config.repo}: {state.error}")
    fleet_models(repository, model, config.lora_base)


def _stop_on_signals() -> threading.Event:
    """An event that SIGINT or SIGTERM sets (from now on)."""
    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())
    return stop
