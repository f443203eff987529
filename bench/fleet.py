"""A fleet changing version: hotweights' two-phase cutover next to Ray Serve's own rollout.

One run, one machine, one model (the 97 MB bench model, two weight sets, versions
alternating between them so every answer names the version that gave it), one open-loop
load per system while 5 new versions go live:

- `hotweights-fleet (2 replicas)`: `hotweights fleet --replicas 2`, each version published
  with `hotweights publish`; live at the commit (peers/hotweights_fleet.py).
- `ray-serve/rolling`: plain Ray Serve, two replicas, each version a new deployment
  version rolled out the way its users do (`max_surge_percent=50`; peers/ray_serve.py);
  live when the rollout finished.
- `hotweights/availability` (one replica, `hotweights serve`, `POST /admin/reload`): the
  reference for "one replica's reload" in the cutover target.

Per system: failed requests; answers from an older version to requests sent after the new
one went live ("old after live": after the commit, for the fleet); the version-skew window
of each reload (from the send time of the first request the new version answered to that
of the last one an older version answered: how long both versions were answering new
requests; zero when no request sent later got an older version); the fleet's prepare,
commit, drain and finish times; p99 and peak RSS as in reload_under_load.py. After its
load, the fleet row runs the load again for 60 s and kills one replica's process a third
of the way in: failed requests and the time until a replacement serves. Then twice more
with the coordinator's process killed a third of the way in: while idle (the next version
is published once Ray has restarted it), and while a cutover prepares the next version:
failed requests, the time until Ray restarted it, and the time from the kill until that
version is live (the time until a publish can go live again). Before the
load, 3 versions go live with nothing else running (`idle`): the cutover target compares
the fleet's cutover (prepare + commit, the coordinator's own times) with one replica's
reload (the server's own time) both idle and under the load.

`--prepare-parallel 0,1` runs the fleet row once per value (all replicas preparing at
once, then one at a time), so the two compare on latency under load and cutover time in
one run; the targets are checked on each fleet row. `--fleet-state ray-kv` keeps the
coordinator's record in Ray's internal key-value store instead of the repository (the
coordinator-kill rows then measure a restart that reads it from there).

    python bench/fleet.py [--duration 150] [--rate 3] [--reloads 5] [--idle-reloads 3]
        [--replicas 2] [--prepare-parallel 0[,N...]] [--fleet-state repo|ray-kv]
        [--systems fleet,ray-rolling,single]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hotweights.fleet.settings import FLEET_STATES
from peers.hotweights_fleet import FleetSystem
from peers.hotweights_server import AdminTrigger, HotweightsSystem
from peers.lineup import make_peer
from peers.loadgen import LoadSpec, MonotonicClock, Record, RssSampler, run_load
from peers.model import SIZES
from peers.procs import wait_quiet
from peers.report import figures
from peers.system import ModelVersion, PeerUnavailable, ReloadResult, System, Workload
from reload_under_load import PROMPT, _build_models, _resolve, _say, _version, _warm

BENCH = Path(__file__).resolve().parent
SYSTEMS = ("fleet", "ray-rolling", "single")
KILLS = ("idle", "prepare")
"""When the coordinator is killed in its rows: with nothing to do, and in a cutover's prepare."""
CUTOVER_TARGET = 1.5
"""The fleet's cutover (prepare + commit) may take this many times one replica's reload."""


def main() -> int:
    args = _parser().parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
    os.environ["BENCH_TORCH_THREADS"] = str(args.torch_threads)
    started = time.monotonic()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hotweights-fleet-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, workdir, started)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=150.0, help="seconds of load each")
    parser.add_argument("--rate", type=float, default=3.0, help="requests per second")
    parser.add_argument("--reloads", type=int, default=5, help="versions made live under load")
    parser.add_argument(
        "--idle-reloads", type=int, default=3, help="versions made live before the load"
    )
    parser.add_argument("--replicas", type=int, default=2, help="replicas of both fleets")
    parser.add_argument(
        "--prepare-parallel",
        type=_counts,
        default=[0],
        help="the fleet's replicas that prepare at once (0: all); several, comma-separated: "
        "a fleet row for each",
    )
    parser.add_argument(
        "--fleet-state",
        choices=FLEET_STATES,
        default="repo",
        help="where the fleet's coordinator keeps its record",
    )
    parser.add_argument(
        "--crash-duration",
        type=float,
        default=60.0,
        help="seconds of load during which one fleet replica is killed (0: none)",
    )
    parser.add_argument(
        "--kill-duration",
        type=float,
        default=45.0,
        help="seconds of load during each coordinator kill (0: none)",
    )
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per answer")
    parser.add_argument("--max-in-flight", type=int, default=32, help="client cap")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--tail", type=float, default=1.0, help="seconds a window extends")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"of {', '.join(SYSTEMS)}")
    parser.add_argument("--torch-threads", type=int, default=1, help="per server process")
    parser.add_argument("--quiet-wait", type=float, default=120.0)
    parser.add_argument(
        "--peer-cache",
        type=Path,
        default=Path(os.environ.get("HOTWEIGHTS_BENCH_PEERS", "~/.cache/hotweights/bench-peers")),
    )
    parser.add_argument("--workdir", help="keep models and logs here")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    return parser


def _counts(text: str) -> list[int]:
    """`0,1` → [0, 1]: each a count of replicas, 0 or more."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 0,1; got {text!r}") from None
    if not counts or min(counts) < 0:
        raise argparse.ArgumentTypeError(f"expected counts of 0 or more like 0,1; got {text!r}")
    return counts


def _run(args: argparse.Namespace, workdir: Path, started: float) -> int:
    size = SIZES["97MB"]
    model = _build_models(workdir / "models", size) | {"size": "97MB"}
    dirs = {"A": workdir / "models" / "1", "B": workdir / "models" / "2"}
    count = args.idle_reloads + args.reloads + len(KILLS) + 2
    versions = [_version(n, dirs) for n in range(1, count)]
    logs = workdir / "logs"
    chosen = [name.strip() for name in args.systems.split(",") if name.strip()]
    results = []
    for name in chosen:
        for system in _systems(name, args, workdir, logs):
            _say(f"{system.name}: starting, {args.duration:g} s of load, {args.reloads} versions")
            entry = _run_system(system, versions, args)
            _say(f"{system.name}: {json.dumps(entry.get('fleet') or entry.get('reason'))}")
            results.append(entry)
    return _write(args, results, model, started)


def _systems(name: str, args: argparse.Namespace, workdir: Path, logs: Path) -> list[System]:
    if name == "fleet":
        return [
            FleetSystem(
                workdir / "repo-fleet",
                logs,
                replicas=args.replicas,
                prepare_parallel=parallel,
                fleet_state=args.fleet_state,
            )
            for parallel in args.prepare_parallel
        ]
    return [_system(name, args, workdir, logs)]


def _system(name: str, args: argparse.Namespace, workdir: Path, logs: Path) -> System:
    if name == "single":
        return HotweightsSystem("availability", AdminTrigger(workdir / "models"), logs)
    if name == "ray-rolling":
        peer = make_peer(
            "ray-rolling",
            cache=args.peer_cache.expanduser(),
            workdir=workdir,
            install_timeout=1800.0,
            start_timeout=300.0,
        )
        if args.replicas != 2:
            raise SystemExit("ray-serve/rolling runs 2 replicas (peers/handlers/ray_app.py)")
        return peer
    raise SystemExit(f"unknown system {name!r}: one of {', '.join(SYSTEMS)}")


def _run_system(
    system: System, versions: list[ModelVersion], args: argparse.Namespace
) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": system.name, "status": "ok"}
    stage = "install"
    workload = Workload(PROMPT, args.max_tokens)
    spec = LoadSpec(args.rate, args.duration, args.max_in_flight, args.timeout)
    try:
        system.install()
        stage = "start"
        began = time.monotonic()
        system.start(versions[0])
        _warm(system, workload)
        entry["start_s"] = round(time.monotonic() - began, 1)
        stage = "run"
        idle = versions[1 : 1 + args.idle_reloads]
        loaded = versions[args.idle_reloads : args.idle_reloads + args.reloads + 1]
        entry["quiet_gate"] = wait_quiet(args.quiet_wait)
        entry["idle"] = idle_figures([system.reload(v, MonotonicClock()) for v in idle])
        clock = MonotonicClock()
        gap = spec.duration / len(loaded)
        schedule = [(gap * index, version) for index, version in enumerate(loaded) if index]
        with RssSampler(system.server_pid(), clock) as sampler:
            records, reloads = asyncio.run(run_load(system, workload, spec, clock, schedule))
        _resolve(system, records, versions)
        entry["figures"] = figures(records, reloads, sampler.samples, tail=args.tail, bare={})
        entry["fleet"] = fleet_figures(records, reloads)
        entry["reloads"] = [_reload(r) for r in reloads]
        entry["cpu"] = sampler.cpu
        entry["records"] = [r.to_dict() for r in records]
        if isinstance(system, FleetSystem) and args.crash_duration > 0:
            entry["crash"] = _crash(system, workload, args)
        if isinstance(system, FleetSystem) and args.kill_duration > 0:
            spare = versions[args.idle_reloads + args.reloads + 1 :]
            entry["coordinator_kills"] = [
                _kill_coordinator(system, workload, args, version, when)
                for version, when in zip(spare, KILLS, strict=False)
            ]
    except PeerUnavailable as exc:
        entry |= {"status": "failed", "stage": exc.stage, "reason": exc.reason}
    except Exception as exc:  # a broken driver is reported like a broken peer
        entry |= {"status": "failed", "stage": stage, "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        system.stop()
    return entry


def fleet_figures(records: list[Record], reloads: list[ReloadResult]) -> dict[str, Any]:
    """Failures, old-after-live answers and the version-skew window of each reload."""
    ok = [r for r in records if not r.failed and r.version is not None]
    skews: list[float] = []
    old_after_live = 0
    for index, reload in enumerate(reloads):
        if not reload.ok:
            continue
        until = reloads[index + 1].trigger if index + 1 < len(reloads) else float("inf")
        window = [r for r in ok if reload.trigger <= r.start < until]
        new = [r.start for r in window if r.version == reload.version]
        old = [r.start for r in window if r.version is not None and r.version < reload.version]
        old_after_live += sum(1 for start in old if start > reload.live)
        skews.append(max(0.0, max(old) - min(new)) if old and new else 0.0)
    server = [r.server for r in reloads if r.ok]
    phases = {
        name: _median([float(s["phases"][name]) for s in server if name in s.get("phases", {})])
        for name in ("prepare", "commit", "drain", "finish")
    }
    return {
        "failed": sum(1 for r in records if r.failed),
        "requests": len(records),
        "old_after_live": old_after_live,
        "skew_s_max": round(max(skews), 4) if skews else None,
        "skew_s_median": _median(skews),
        "reloads_ok": sum(1 for r in reloads if r.ok),
        "live_s_median": _median([r.seconds for r in reloads if r.ok]),
        "server_reload_s_median": _median(
            [float(s["duration_s"]) for s in server if "duration_s" in s]
        ),
        "phases_s_median": {k: v for k, v in phases.items() if v is not None},
    }


def _crash(system: FleetSystem, workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """The same load for `crash_duration` s; a third of the way in, one replica's process
    is killed. Counts what failed, and how long until a replacement serves the committed
    version."""
    clock = MonotonicClock()
    spec = LoadSpec(args.rate, args.crash_duration, args.max_in_flight, args.timeout)
    done: list[list[Record]] = []
    loader = threading.Thread(
        target=lambda: done.append(asyncio.run(run_load(system, workload, spec, clock, []))[0])
    )
    loader.start()
    time.sleep(args.crash_duration / 3)  # a point in the load, not a synchronisation
    victim = system.kill_replica()
    killed = clock()
    recovered = None
    while loader.is_alive() and recovered is None:
        if system.recovered(victim):
            recovered = clock()
        else:
            time.sleep(0.1)
    loader.join()
    records = done[0] if done else []
    failed = [r for r in records if r.failed]
    return {
        "requests": len(records),
        "failed": len(failed),
        "failed_started_before_kill": sum(1 for r in failed if r.start <= killed),
        "failed_started_after_kill": sum(1 for r in failed if r.start > killed),
        "failed_by_outcome": dict(Counter(r.outcome for r in failed)),
        "errors": sorted({(r.error or "")[:160] for r in failed}),
        "killed_at_s": round(killed, 3),
        "replaced_after_s": None if recovered is None else round(recovered - killed, 3),
    }


def _kill_coordinator(
    system: FleetSystem,
    workload: Workload,
    args: argparse.Namespace,
    version: ModelVersion,
    when: str,
) -> dict[str, Any]:
    """The same load for `kill_duration` s; a third of the way in, the coordinator's
    process is killed: `idle` (then `version` is published once Ray restarted it), or
    `prepare` (`version` is published and the kill lands while it prepares). Counts what
    failed, and the time from the kill until `version` is live."""
    clock = MonotonicClock()
    spec = LoadSpec(args.rate, args.kill_duration, args.max_in_flight, args.timeout)
    done: list[list[Record]] = []
    loader = threading.Thread(
        target=lambda: done.append(asyncio.run(run_load(system, workload, spec, clock, []))[0])
    )
    loader.start()
    time.sleep(args.kill_duration / 3)  # a point in the load, not a synchronisation
    if when == "prepare" and (error := system.publish(version)):
        raise RuntimeError(error)
    restarts, landed = system.kill_coordinator(preparing=when == "prepare")
    killed = clock()
    deadline = time.monotonic() + 300
    while not system.restarted(restarts) and time.monotonic() < deadline:
        time.sleep(0.05)
    restarted = clock()
    if when == "idle" and (error := system.publish(version)):
        raise RuntimeError(error)
    while not system.live(version.number) and time.monotonic() < deadline:
        time.sleep(0.05)
    live = clock() if system.live(version.number) else None
    loader.join()
    records = done[0] if done else []
    failed = [r for r in records if r.failed]
    return {
        "when": when,
        "landed_in": landed,
        "requests": len(records),
        "failed": len(failed),
        "errors": sorted({(r.error or "")[:160] for r in failed}),
        "killed_at_s": round(killed, 3),
        "restarted_after_s": round(restarted - killed, 3),
        "live_after_s": None if live is None else round(live - killed, 3),
    }


def idle_figures(reloads: list[ReloadResult]) -> dict[str, Any]:
    """Reloads with no load running: trigger to live and the server's own reload time."""
    ok = [r for r in reloads if r.ok]
    return {
        "reloads": len(reloads),
        "reloads_ok": len(ok),
        "failures": [r.detail for r in reloads if not r.ok],
        "live_s_median": _median([r.seconds for r in ok]),
        "server_reload_s_median": _median(
            [float(r.server["duration_s"]) for r in ok if "duration_s" in r.server]
        ),
        "each": [_reload(r) for r in reloads],
    }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def _reload(result: ReloadResult) -> dict[str, Any]:
    return {
        "version": result.version,
        "trigger": round(result.trigger, 4),
        "live": round(result.live, 4),
        "seconds": round(result.seconds, 4),
        "ok": result.ok,
        "detail": result.detail,
        "server": result.server,
    }


def _write(
    args: argparse.Namespace, results: list[dict[str, Any]], model: dict[str, Any], started: float
) -> int:
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    command = " ".join(["python bench/fleet.py", *sys.argv[1:]])
    wall = round(time.monotonic() - started, 1)
    checks = targets(results)
    document = {
        "benchmark": "fleet",
        "date": date,
        "wall_s": wall,
        "command": command,
        "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "out")}
        | {"prompt": PROMPT},
        "model": model,
        "targets": checks,
        "systems": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_text(json.dumps(document, indent=1, default=str))
    text = (
        f"Fleet cutover, {date}; `{command}`; wall {wall} s\n\n"
        f"{args.rate:g} req/s for {args.duration:g} s per system, {args.reloads} new versions, "
        f"{args.max_tokens} greedy tokens per request; model {model['parameters_m']} M "
        f"parameters ({model['weights_mb']} MB), {args.replicas} replicas per fleet\n\n"
        f"{markdown(results)}\n\n{targets_markdown(checks)}\n"
    )
    (args.out / "fleet.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'fleet.json'}, {args.out / 'fleet.md'}")
    return 0


def markdown(results: list[dict[str, Any]]) -> str:
    head = (
        "| system | failed | old after live | skew max / median (s) | live s (trigger → live) "
        "| server reload s: under load / idle | prepare / commit / drain / finish (s) "
        "| p99 steady → reload (ms) | peak RSS / steady |\n|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for entry in results:
        if entry["status"] != "ok":
            rows.append(f"| {entry['name']} | {entry['stage']} failed: {entry['reason'][:120]} |")
            continue
        f, g = entry["fleet"], entry["figures"]
        phases = f["phases_s_median"]
        phase_text = (
            " / ".join(str(phases.get(k, "–")) for k in ("prepare", "commit", "drain", "finish"))
            if phases
            else "–"
        )
        rows.append(
            f"| {entry['name']} | {f['failed']} / {f['requests']} | {f['old_after_live']} "
            f"| {f['skew_s_max']} / {f['skew_s_median']} | {f['live_s_median']} "
            f"| {f['server_reload_s_median'] or '–'} / "
            f"{entry['idle']['server_reload_s_median'] or '–'} | {phase_text} "
            f"| {g['steady_p99_ms']} → {g['reload_p99_ms']} | {g['rss_peak_ratio']} |"
        )
    for entry in results:
        crash = entry.get("crash")
        if crash:
            rows.append(
                f"\n{entry['name']}, one replica's process killed (SIGKILL) "
                f"{crash['killed_at_s']} s into {crash['requests']} requests: "
                f"{crash['failed']} failed ({crash['failed_started_before_kill']} sent before "
                f"the kill, {crash['failed_started_after_kill']} after), a replacement "
                f"serving the committed version {crash['replaced_after_s']} s after the kill"
            )
        for kill in entry.get("coordinator_kills", []):
            rows.append(
                f"\n{entry['name']}, the coordinator's process killed (SIGKILL) {kill['when']} "
                f"(its record said: {kill['landed_in']}) {kill['killed_at_s']} s into "
                f"{kill['requests']} requests: {kill['failed']} failed; Ray restarted it "
                f"{kill['restarted_after_s']} s after the kill; the next version live "
                f"{kill['live_after_s']} s after the kill"
            )
    return "\n".join(rows)


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each met or missed with the figures behind it, for each fleet
    row (named in the target when there are several)."""
    ok = [e for e in results if e["status"] == "ok"]
    fleets = [e for e in ok if e["name"].startswith("hotweights-fleet")]
    rows: list[dict[str, Any]] = []
    for fleet in fleets:
        checked = fleet_targets(fleet, ok)
        if len(fleets) > 1:
            for row in checked:
                row["target"] = f"{fleet['name']}: {row['target']}"
        rows += checked
    return rows


def fleet_targets(fleet: dict[str, Any], ok: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets of one fleet row, against the other systems' rows in `ok`."""
    by_name = {e["name"].split(" ")[0]: e for e in ok}
    ray, single = by_name.get("ray-serve/rolling"), by_name.get("hotweights/availability")
    rows: list[dict[str, Any]] = []
    f = fleet["fleet"]
    rows.append(_row("fleet: 0 failed", f["failed"] == 0, f"{f['failed']} of {f['requests']}"))
    rows.append(
        _row("fleet: 0 old after commit", f["old_after_live"] == 0, str(f["old_after_live"]))
    )
    for kill in fleet.get("coordinator_kills", []):
        rows.append(
            _row(
                f"fleet: 0 failed, coordinator killed {kill['when']}",
                kill["failed"] == 0 and kill["live_after_s"] is not None,
                f"{kill['failed']} of {kill['requests']}; live again "
                f"{kill['live_after_s']} s after the kill",
            )
        )
    if ray is not None:
        r = ray["fleet"]
        rows.append(
            _row(
                "fewer failed than Ray Serve's rollout",
                f["failed"] < r["failed"] or f["failed"] == r["failed"] == 0,
                f"{f['failed']} vs {r['failed']}",
            )
        )
        rows.append(
            _row(
                "shorter version-skew window than Ray Serve's rollout",
                (f["skew_s_max"] or 0) < (r["skew_s_max"] or 0),
                f"max {f['skew_s_max']} s vs {r['skew_s_max']} s",
            )
        )
    if single is not None:
        for when, key in (("under load", "fleet"), ("idle", "idle")):
            cutover = fleet[key]["server_reload_s_median"]
            one = single[key]["server_reload_s_median"]
            ratio = round(cutover / one, 2) if cutover and one else None
            rows.append(
                _row(
                    f"cutover ≤ {CUTOVER_TARGET}x one replica's reload, {when}",
                    ratio is not None and ratio <= CUTOVER_TARGET,
                    f"{cutover} s vs {one} s: {ratio}x",
                )
            )
    return rows


def _row(target: str, met: bool, figures: str) -> dict[str, Any]:
    return {"target": target, "met": met, "figures": figures}


def targets_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | met | figures |", "|---|---|---|"]
    lines += [
        f"| {r['target']} | {'met' if r['met'] else '**missed**'} | {r['figures']} |" for r in rows
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
