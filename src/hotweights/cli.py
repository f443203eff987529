"""`hotweights`: serve, fleet, publish, gate, reload, rollback, promote, status, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hotweights import __version__
from hotweights.backends.devices import parse_device
from hotweights.backends.transformers_lm import DTYPES
from hotweights.config import LOAD_IN_SETTINGS, TOOL_PARSER_SETTINGS, Config
from hotweights.console import LoadProgress, say
from hotweights.core import SWAP_POLICIES
from hotweights.digests import DEFAULT_ALGORITHM, DIGEST_ALGORITHMS
from hotweights.errors import HotweightsError
from hotweights.fleet.command import add_fleet_command
from hotweights.server.admin_client import DEFAULT_URL, add_client_commands
from hotweights.sources import VERIFY_MODES, WATCHER_KINDS

if TYPE_CHECKING:
    from hotweights.core.gate import GateVerdict
    from hotweights.sources.gate_spec import GateSpec


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotweights", description="Model serving with zero-downtime weight reloads."
    )
    parser.add_argument("--version", action="version", version=f"hotweights {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a model directory (default: the demo model)")
    serve.add_argument("path", nargs="?", help="Hugging Face model directory")
    serve.add_argument("--host", help="interface (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (default 8000)")
    serve.add_argument("--name", dest="model_name", help="model name clients use")
    serve.add_argument("--policy", choices=SWAP_POLICIES, help="swap policy")
    serve.add_argument(
        "--drain-timeout", type=float, help="seconds before a retired version is unloaded anyway"
    )
    serve.add_argument(
        "--admission-timeout", type=float, help="seconds a request waits during a resource swap"
    )
    serve.add_argument("--admin-token", help="bearer token for /admin (required beyond loopback)")
    serve.add_argument("--api-key", help="bearer token required on /v1 endpoints")
    serve.add_argument("--audit-file", help="JSON-lines file every reload event is appended to")
    serve.add_argument("--max-pending", type=int, help="requests per model at once; then 429")
    serve.add_argument(
        "--phase-timeout", type=float, help="seconds a load, validate or warmup may take (0: none)"
    )
    serve.add_argument(
        "--gate", help="gate file (JSON) every new version must pass before it goes live"
    )
    canary = serve.add_argument_group("canary (availability policy)")
    canary.add_argument(
        "--canary", help="bake each new version on this share of new requests first, e.g. 10%%"
    )
    canary.add_argument("--bake", help="how long a canary bakes before promotion (60s)")
    canary.add_argument(
        "--canary-max-error-rate",
        type=float,
        help="roll back above the stable error rate plus this (0.05)",
    )
    canary.add_argument(
        "--canary-max-latency-ratio",
        type=float,
        help="roll back above this ratio of the stable p99 or time per token (2.0)",
    )
    canary.add_argument(
        "--canary-min-requests", type=int, help="requests before a canary is judged (20)"
    )
    serve.add_argument("--tool-parser", choices=TOOL_PARSER_SETTINGS)  # auto: the template's
    serve.add_argument("--dtype", choices=DTYPES)
    serve.add_argument(
        "--device", type=_device, help="cpu (default), cuda or cuda:N: where weights live"
    )
    serve.add_argument(
        "--load-in",
        choices=LOAD_IN_SETTINGS,
        help="read checkpoints in a helper process (from_pretrained's Python off this "
        "process's GIL, but the weights copied) or on the reloader's thread; auto (default): "
        "under availability the helper below 384 MiB of weights, the thread from there on; "
        "under resource the thread",
    )
    engine = serve.add_argument_group("batched generation")
    engine.add_argument(
        "--max-batch-size", type=int, help="sequences one version's engine steps together (32)"
    )
    engine.add_argument(
        "--kv-cache-memory",
        help="each engine's key/value cache, e.g. 512MiB or 2GB (auto: a full batch of the "
        "longest sequences, at most a quarter of available memory)",
    )
    engine.add_argument("--max-batch-tokens", type=int, help="tokens in one engine pass (256)")
    engine.add_argument("--prefill-chunk", type=int, help="prompt tokens one pass reads (128)")
    engine.add_argument("--threads", type=int, help="torch threads (0, default: one per core)")
    serve.add_argument("--lora-base", help="base model of adapters whose config names none served")
    serve.add_argument("--max-resident-adapters", type=int, help="adapters in memory (0: all)")
    engine.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false")
    serve.set_defaults(prefix_cache=None)  # unset: the environment or the default decides
    engine.add_argument(
        "--no-batching",
        dest="batching",
        action="store_false",
        default=None,
        help="one decode loop per request instead of the batched engine",
    )
    serve.add_argument(
        "--model-root",
        action="append",
        dest="model_roots",
        help="directory reload paths must lie in (repeatable)",
    )
    serve.add_argument(
        "--allow-pickle",
        action="store_true",
        default=None,
        help="accept pickle-based weights (unsafe)",
    )
    serve.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="run code shipped with the model (unsafe)",
    )
    serve.set_defaults(run=_serve)

    repo = serve.add_argument_group("model repository")
    repo.add_argument("--repo", help="serve every model of ROOT/<model>/<version>/, watched")
    repo.add_argument("--watch", choices=WATCHER_KINDS, help="file events, polling, or auto")
    repo.add_argument("--poll-interval", type=float, help="seconds between scans when polling")
    repo.add_argument("--verify", choices=VERIFY_MODES, help="check files against the manifest")
    repo.add_argument("--settle-seconds", type=float, help="quiet time for manifest-less versions")

    publish = commands.add_parser("publish", help="publish a model directory as a new version")
    publish.add_argument("src", help="directory to publish (copied unless --link or --move)")
    publish.add_argument("--repo", required=True, help="repository root")
    publish.add_argument("--model", required=True, help="model name (a directory of the root)")
    publish.add_argument("--version", type=int, help="version number (default: the next)")
    publish.add_argument("--description", default="", help="recorded in the manifest")
    how = publish.add_mutually_exclusive_group()
    how.add_argument(
        "--link",
        dest="mode",
        action="store_const",
        const="link",
        help="reflink (else hard-link) the files: same filesystem only; safe only if the "
        "trainer never rewrites a published file",
    )
    how.add_argument(
        "--move",
        dest="mode",
        action="store_const",
        const="move",
        help="move the files into the repository: same filesystem only",
    )
    publish.add_argument(
        "--digest",
        choices=DIGEST_ALGORITHMS,
        default=DEFAULT_ALGORITHM,
        help=f"digest algorithm of the manifest (default: {DEFAULT_ALGORITHM})",
    )
    publish.set_defaults(run=_publish, mode="copy")

    push = commands.add_parser("push", help="send weights to a running server as a new version")
    push.add_argument("weights", help="a safetensors file, or a directory of safetensors shards")
    push.add_argument("--url", default=os.environ.get("HOTWEIGHTS_URL", DEFAULT_URL))
    push.add_argument("--admin-token", default=os.environ.get("HOTWEIGHTS_ADMIN_TOKEN"))
    push.add_argument("--model", help="model name (default: the only one served)")
    push.add_argument("--base", type=int, help="version it builds on (default: the live one)")
    push.add_argument("--description", default="", help="recorded with the version")
    push.set_defaults(run=_push)

    add_fleet_command(commands, _device, _demo_repository)

    gate = commands.add_parser(
        "gate", help="judge a candidate version with a gate file offline; exit 0 if it passes"
    )
    gate.add_argument("candidate", help="the candidate version's model directory")
    gate.add_argument("--against", help="the live version's directory, for the ratio checks")
    gate.add_argument(
        "--gate", dest="gate_file", help="gate file (default: none; the candidate's gate.json)"
    )
    gate.add_argument("--dtype", choices=DTYPES, default="auto")
    gate.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    gate.add_argument("--json", action="store_true", help="print the verdict as JSON")
    gate.set_defaults(run=_gate)

    add_client_commands(commands)

    demo = commands.add_parser("demo", help="swap a model live under traffic and show it")
    demo.add_argument("--duration", type=float, default=24.0, help="seconds of traffic")
    demo.add_argument("--concurrency", type=int, default=4, help="clients sending at once")
    demo.add_argument("--policy", choices=SWAP_POLICIES, default="availability")
    demo.add_argument("--rebuild", action="store_true", help="retrain the demo models")
    demo.add_argument(
        "--bad-version",
        action="store_true",
        help="first publish a version that answers wrongly, and watch the gate refuse it",
    )
    demo.add_argument("--lora", action="store_true", help="two LoRA adapters changing version")
    demo.set_defaults(run=_demo)
    return parser


SERVE_SETTINGS = (
    "host", "port", "model_name", "repo", "watch", "poll_interval", "verify", "settle_seconds",
    "policy", "drain_timeout", "admission_timeout", "admin_token", "phase_timeout", "gate",
    "canary", "bake", "canary_max_error_rate", "canary_max_latency_ratio",
    "canary_min_requests", "api_key", "audit_file", "max_pending", "dtype", "device",
    "allow_pickle", "trust_remote_code", "load_in", "tool_parser", "max_batch_size",
    "kv_cache_memory", "batching", "max_batch_tokens", "prefill_chunk", "prefix_cache",
    "threads", "lora_base", "max_resident_adapters",
)  # fmt: skip


def _device(value: str) -> str:
    """`parse_device` for argparse, so a bad name's message reaches the user."""
    try:
        return parse_device(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _demo_repository() -> tuple[Path, str]:
    """The repository `hotweights fleet` serves when given none: the demo's version one."""
    from hotweights.demo.versions import demo_repository

    return demo_repository(progress=say)


def _serve(args: argparse.Namespace) -> int:
    from hotweights.server.assembly import build_state
    from hotweights.server.runner import serve

    overrides = {key: getattr(args, key) for key in SERVE_SETTINGS}
    if args.model_roots:
        overrides["model_roots"] = tuple(args.model_roots)
    if args.path:
        overrides["source"] = args.path
    try:
        config = Config.load(overrides)
        if config.source is None and config.repo is None:
            from hotweights.demo.versions import build_demo_versions

            first, _ = build_demo_versions(progress=say)
            name = config.model_name or "hotweights-demo"
            config = Config.load({**overrides, "source": str(first), "model_name": name})
        state = build_state(config, observers=(LoadProgress(),))
    except (ValueError, HotweightsError) as exc:
        print(f"hotweights serve: {exc}", file=sys.stderr)
        return 2
    what = f"repository {config.repo}" if config.repo else str(config.source)
    names = ", ".join(sorted(state.models))
    say(f"serving {what} ({names}) on http://{config.host}:{config.port}")
    serve(state)
    return 0


def _push(args: argparse.Namespace) -> int:
    from hotweights.push_client import PushFailed, push_file

    try:
        event = push_file(
            args.url, args.weights, args.model, args.base, args.description, args.admin_token
        )
    except PushFailed as exc:
        print(f"hotweights: {exc}", file=sys.stderr)
        return 1 if exc.status else 3
    print(json.dumps(event.to_dict(), indent=2))
    return 0


def _publish(args: argparse.Namespace) -> int:
    from hotweights.sources import publish

    try:
        published = publish(
            args.src,
            args.repo,
            args.model,
            version=args.version,
            description=args.description,
            mode=args.mode,
            algorithm=args.digest,
        )
    except (HotweightsError, OSError) as exc:
        print(f"hotweights publish: {exc}", file=sys.stderr)
        return 1
    say(f"published {args.src} as {args.model} version {published.version}: {published.path}")
    print(published.version)
    return 0


def _gate(args: argparse.Namespace) -> int:
    from hotweights.sources.gate_spec import GATE_FILE, GateSpec
    from hotweights.sources.quality_gate import verdict_table

    try:
        spec = GateSpec.from_file(args.gate_file) if args.gate_file else None
        if spec is None and not os.path.isfile(os.path.join(args.candidate, GATE_FILE)):
            raise HotweightsError(f"no gate: give --gate FILE or put {GATE_FILE} in the candidate")
        verdict = _judge_offline(spec, args)
    except (HotweightsError, OSError) as exc:
        print(f"hotweights gate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        checks = [check.to_dict() for check in verdict.checks]
        print(json.dumps({"passed": verdict.passed, "checks": checks}, indent=2))
    else:
        print(verdict_table(verdict))
    say(f"gate {'passed' if verdict.passed else 'refused'}: {args.candidate}")
    return 0 if verdict.passed else 1


def _judge_offline(spec: GateSpec | None, args: argparse.Namespace) -> GateVerdict:
    """Load `--against` (if given) and measure the baseline, unload it, then load and judge
    the candidate: one model in memory at a time."""
    from hotweights.backends import TransformersLoader
    from hotweights.sources.quality_gate import QualityGate

    loader = TransformersLoader(dtype=args.dtype, device=args.device, load_in="thread")
    gate = QualityGate(spec)
    try:
        baseline: object = gate.baseline(args.candidate, None)
        if args.against:
            live = loader.load(args.against)
            try:
                loader.validate(live)
                baseline = gate.baseline(args.candidate, live)
            finally:
                loader.unload(live)
        candidate = loader.load(args.candidate)
        try:
            loader.validate(candidate)
            loader.warmup(candidate)
            return gate.judge(args.candidate, candidate, baseline)
        finally:
            loader.unload(candidate)
    finally:
        loader.close()


def _demo(args: argparse.Namespace) -> int:
    from hotweights.demo.run import run_demo

    return run_demo(
        args.duration, args.concurrency, args.policy, args.rebuild, args.bad_version, args.lora
    )


if __name__ == "__main__":
    sys.exit(main())
