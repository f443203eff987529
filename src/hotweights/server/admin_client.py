"""`hotweights reload | rollback | promote | status`: the admin API of a running server
(`server/admin.py`), called over HTTP. Each prints the server's JSON answer and exits 0 on
success, 1 when the server refused (its error message on stderr), 3 when it could not be
reached. Imports httpx only when a command runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


def add_client_commands(commands: Any) -> None:
    """Add the four admin client commands to the CLI's subcommands."""
    for name, helptext, runner in (
        ("reload", "make a new version live on a running server", _reload),
        ("rollback", "make the previous version live again (or roll a canary back)", _rollback),
        ("promote", "end a canary's bake now and make it live", _promote),
        ("status", "show the live version, in-flight requests and recent reloads", _status),
    ):
        client = commands.add_parser(name, help=helptext)
        client.add_argument("--url", default=os.environ.get("HOTWEIGHTS_URL", DEFAULT_URL))
        client.add_argument("--admin-token", default=os.environ.get("HOTWEIGHTS_ADMIN_TOKEN"))
        if name in ("reload", "rollback", "promote"):
            client.add_argument("--model", help="the model (default: the only one served)")
        if name == "reload":
            client.add_argument(
                "path", nargs="?", help="model directory (default: reload the live one)"
            )
            client.add_argument("--description", default="")
            client.add_argument(
                "--no-wait", action="store_true", help="return at once with the event id"
            )
        if name == "rollback":
            client.add_argument("--description", default="")
        client.set_defaults(run=runner)


def _client(args: argparse.Namespace) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {args.admin_token}"} if args.admin_token else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=None)


def _call(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None
) -> int:
    import httpx

    try:
        with _client(args) as client:
            response = client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        print(f"hotweights: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 3
    payload = response.json() if response.content else {}
    print(json.dumps(payload, indent=2))
    if response.is_success:
        return 0
    error = payload.get("error", {}) if isinstance(payload, dict) else {}
    print(
        f"hotweights: {response.status_code}: {error.get('message', response.text)}",
        file=sys.stderr,
    )
    return 1


def _reload(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"description": args.description, "wait": not args.no_wait}
    if args.model:
        body["model"] = args.model
    if args.path:
        body["path"] = os.path.abspath(args.path)
    return _call(args, "POST", "/admin/reload", body)


def _rollback(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"description": args.description}
    if args.model:
        body["model"] = args.model
    return _call(args, "POST", "/admin/rollback", body)


def _promote(args: argparse.Namespace) -> int:
    path = f"/admin/models/{args.model}/promote" if args.model else "/admin/promote"
    return _call(args, "POST", path)


def _status(args: argparse.Namespace) -> int:
    return _call(args, "GET", "/admin/status")
