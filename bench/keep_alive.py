"""Idle connections: does a pooled client connection race the server closing it?

Starts `hotweights serve` (the demo model) with a given `keep_alive_timeout`, then 40 httpx
clients each send `--requests` GETs of /ready on one pooled connection, pausing 4.98-5.02 s
between two (httpx's and the openai client's pool keep an idle connection 5 s). A server
that closes idle connections after 5 s (uvicorn's default) closes some of them just as
the client sends on them: those requests fail with "Server disconnected without sending a
response". Prints what every request ended with, per server setting.

    python bench/keep_alive.py [--server-keep-alive 5,120] [--client-expiry 5] [--requests 12]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
from collections import Counter

import httpx

from peers.procs import free_port, stop_group, wait_http

CLIENTS = 40


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-keep-alive", default="5,120", help="seconds, comma-separated")
    parser.add_argument("--client-expiry", type=float, default=5.0, help="httpx keepalive_expiry")
    parser.add_argument("--requests", type=int, default=12, help="per client")
    args = parser.parse_args()
    for setting in args.server_keep_alive.split(","):
        outcomes = _run(float(setting), args.client_expiry, args.requests)
        failed = sum(n for outcome, n in outcomes.items() if outcome != "ok")
        print(
            f"server keep-alive {setting} s, client expiry {args.client_expiry:g} s: "
            f"{failed} failed of {sum(outcomes.values())}: {dict(outcomes)}",
            flush=True,
        )
    return 0


def _run(keep_alive: float, expiry: float, requests: int) -> Counter[str]:
    port = free_port()
    env = {**os.environ, "HOTWEIGHTS_KEEP_ALIVE_TIMEOUT": str(keep_alive)}
    command = [sys.executable, "-m", "hotweights.cli", "serve", "--port", str(port)]
    server = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", timeout=180, process=server)
        return asyncio.run(_clients(f"http://127.0.0.1:{port}", expiry, requests))
    finally:
        stop_group(server)


async def _clients(url: str, expiry: float, requests: int) -> Counter[str]:
    outcomes: Counter[str] = Counter()

    async def client() -> None:
        limits = httpx.Limits(keepalive_expiry=expiry)
        async with httpx.AsyncClient(base_url=url, limits=limits) as session:
            for _ in range(requests):
                try:
                    (await session.get("/ready")).raise_for_status()
                    outcomes["ok"] += 1
                except httpx.HTTPError as exc:
                    outcomes[f"{type(exc).__name__}: {exc}"[:80]] += 1
                await asyncio.sleep(4.98 + random.random() * 0.04)

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return outcomes


if __name__ == "__main__":
    sys.exit(main())
