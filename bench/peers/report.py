"""Figures from one system's run: failures, latency in steady and reload windows, the
longest stall, reload time, resident memory; and the markdown tables.

Definitions (bench/README.md repeats them):

- A *reload window* runs from a reload's trigger to the moment the system said the new
  version is live, plus `tail` seconds (requests admitted right after a swap may meet a
  cold cache or a drain), or to the end of the reload's last synchronous step (a peer's
  unregister of the old version) if that is later. A request belongs to it when its
  [start, end] overlaps it; every other request is *steady*.
- Percentiles are nearest-rank over the requests that succeeded.
- The *longest stall* is the longest interval, between the first request's due time and
  the last one's, in which no request completed successfully.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from peers.loadgen import Record
from peers.system import ReloadResult

MB = 1024 * 1024


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile `q` (0-100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def windows(reloads: Iterable[ReloadResult], tail: float) -> list[tuple[float, float]]:
    return [(r.trigger, window_end(r, tail)) for r in reloads]


def window_end(reload: ReloadResult, tail: float) -> float:
    """`tail` seconds past live, or the end of the reload's last step if that is later."""
    return max(reload.live + tail, reload.done or 0.0)


def in_windows(start: float, end: float, spans: Sequence[tuple[float, float]]) -> bool:
    return any(start <= w_end and end >= w_start for w_start, w_end in spans)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def longest_stall(records: Sequence[Record]) -> tuple[float, float]:
    """(seconds, start) of the longest interval with no successful completion."""
    if not records:
        return 0.0, 0.0
    begin = min(r.scheduled for r in records)
    finish = max(r.scheduled for r in records)
    ends = sorted(r.end for r in records if not r.failed and begin <= r.end <= finish)
    marks = [begin, *ends, finish]
    gaps = [(b - a, a) for a, b in itertools.pairwise(marks)]
    return max(gaps)


def _live_during_load(records: Sequence[Record], reloads: Sequence[ReloadResult]) -> int:
    """Reloads that went live before the last request was due: a slow system's later
    reloads may only finish after the load, and windows without requests judge nothing."""
    last_due = max((r.scheduled for r in records), default=0.0)
    return sum(1 for r in reloads if r.ok and r.live <= last_due)


def wrong_answers(records: Sequence[Record]) -> int:
    """Answers whose text differs from the most common text of their weight set (greedy
    decoding of one fixed prompt: every answer from the same weights must be the same)."""
    by_weights: dict[str, Counter[str]] = {}
    for r in records:
        if not r.failed and r.weights is not None and r.text is not None:
            by_weights.setdefault(r.weights, Counter())[r.text] += 1
    modal = {w: texts.most_common(1)[0][0] for w, texts in by_weights.items()}
    return sum(
        1 for r in records if not r.failed and (r.weights is None or r.text != modal.get(r.weights))
    )


def figures(
    records: Sequence[Record],
    reloads: Sequence[ReloadResult],
    rss: Sequence[tuple[float, int]],
    *,
    tail: float,
    bare: dict[str, float],
) -> dict[str, Any]:
    """Every figure of one system's run under load."""
    spans = windows(reloads, tail)
    ok = [r for r in records if not r.failed]
    steady = [r.latency for r in ok if not in_windows(r.start, r.end, spans)]
    reload_lat = [r.latency for r in ok if in_windows(r.start, r.end, spans)]
    stall, stall_at = longest_stall(records)
    p50_s, p99_s = percentile(steady, 50), percentile(steady, 99)
    p50_r, p99_r = percentile(reload_lat, 50), percentile(reload_lat, 99)
    live = [r.seconds for r in reloads if r.ok]
    server_live = [
        float(r.server["duration_s"]) for r in reloads if r.ok and "duration_s" in r.server
    ]
    server_median = statistics.median(server_live) if server_live else None
    reload_median = statistics.median(live) if live else None
    steady_rss = [b for t, b in rss if not in_windows(t, t, spans)]
    reload_rss = [b for t, b in rss if in_windows(t, t, spans)]
    rss_steady = statistics.median(steady_rss) if steady_rss else None
    rss_peak = max(reload_rss) if reload_rss else None
    outcomes = Counter(r.outcome for r in records)
    return {
        "requests": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "failed_by_outcome": {k: v for k, v in outcomes.items() if k != "ok"},
        "failed_in_reload_windows": sum(
            1 for r in records if r.failed and in_windows(r.start, r.end, spans)
        ),
        "wrong_answers": wrong_answers(records),
        "answers_by_version": dict(sorted(Counter(r.version for r in ok).items(), key=str)),
        "steady_n": len(steady),
        "reload_n": len(reload_lat),
        "steady_p50_ms": _ms(p50_s),
        "steady_p99_ms": _ms(p99_s),
        "reload_p50_ms": _ms(p50_r),
        "reload_p99_ms": _ms(p99_r),
        "p50_ratio": _ratio(p50_r, p50_s),
        "p99_ratio": _ratio(p99_r, p99_s),
        "longest_stall_s": round(stall, 3),
        "longest_stall_at_s": round(stall_at, 3),
        "longest_stall_in_reload_window": in_windows(stall_at, stall_at + stall, spans),
        "reloads": len(reloads),
        "reloads_ok": len(live),
        "reloads_live_during_load": _live_during_load(records, reloads),
        "reload_s_median": None if reload_median is None else round(reload_median, 3),
        "reload_s_max": round(max(live), 3) if live else None,
        "reload_vs_bare_cold": _ratio(reload_median, bare.get("total_s")),
        "reload_vs_bare_warm": _ratio(reload_median, bare.get("repeat_total_s")),
        "server_reload_s_median": None if server_median is None else round(server_median, 3),
        "rss_steady_mb": None if rss_steady is None else round(rss_steady / MB, 1),
        "rss_peak_reload_mb": None if rss_peak is None else round(rss_peak / MB, 1),
        "rss_peak_ratio": _ratio(rss_peak, rss_steady),
    }


SOAK_READS = 5
"""RSS reads whose median stands for each end of the soak."""


def soak_figures(
    rss_after: Sequence[int],
    seconds: Sequence[float],
    server_seconds: Sequence[float],
    bare: dict[str, float],
) -> dict[str, Any]:
    """Figures of back-to-back reloads without load: RSS after the last reloads vs after the
    first (each read once the old version was unloaded; the median of `SOAK_READS` reads at
    each end, since one read can land while the allocator still holds what the unload
    freed), and the idle reload time, from the trigger and as the server timed its own
    reload."""
    median = statistics.median(seconds) if seconds else None
    server = statistics.median(server_seconds) if server_seconds else None
    ends = min(SOAK_READS, len(rss_after) // 2) or len(rss_after)
    first = statistics.median(rss_after[:ends]) if rss_after else None
    last = statistics.median(rss_after[-ends:]) if rss_after else None
    return {
        "reloads": len(rss_after),
        "reads_each_end": ends,
        "rss_after_first_mb": None if first is None else round(first / MB, 1),
        "rss_after_last_mb": None if last is None else round(last / MB, 1),
        "rss_last_vs_first": _ratio(last, first),
        "rss_after_each_mb": [round(b / MB, 1) for b in rss_after],
        "reload_s_median": None if median is None else round(median, 3),
        "reload_s_all": [round(s, 3) for s in seconds],
        "reload_vs_bare_cold": _ratio(median, bare.get("total_s")),
        "reload_vs_bare_warm": _ratio(median, bare.get("repeat_total_s")),
        "server_reload_s_median": None if server is None else round(server, 3),
        "server_reload_vs_bare_cold": _ratio(server, bare.get("total_s")),
        "server_reload_vs_bare_warm": _ratio(server, bare.get("repeat_total_s")),
    }


def _cell(value: Any, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:g}{suffix}"
    return f"{value}{suffix}"


def markdown(systems: Sequence[dict[str, Any]]) -> str:
    """The results table: one row per system, a failed system with its stage and reason."""
    head = (
        "| system | failed / requests | p50 steady → reload (ms) | p99 steady → reload (ms) "
        "| p99 ratio (reload p99) | longest stall (s) | reload s (median) "
        "| reload / bare load (cold, warm) | peak RSS / steady | RSS after the last 5 of N reloads "
        "/ after the first 5 (medians) "
        "| other processes (cores) |"
    )
    lines = [head, "|" + "---|" * 11]
    for system in systems:
        name = system["name"]
        if system["status"] != "ok":
            reason = system["reason"].replace("|", "/").replace("\n", " ")[:240]
            lines.append(f"| {name} | not run: {system['stage']} failed: {reason} |" + " |" * 9)
            continue
        f = system["figures"]
        soak = system.get("soak") or {}
        soak_cell = (
            f"{_cell(soak.get('rss_last_vs_first'))} (N={soak.get('reloads')})" if soak else "–"
        )
        bare_cell = f"{_cell(f['reload_vs_bare_cold'])}, {_cell(f['reload_vs_bare_warm'])}"
        lines.append(
            f"| {name} | {f['failed']} / {f['requests']} "
            f"| {_cell(f['steady_p50_ms'])} → {_cell(f['reload_p50_ms'])} "
            f"| {_cell(f['steady_p99_ms'])} → {_cell(f['reload_p99_ms'])} "
            f"| {_p99(f)} | {_cell(f['longest_stall_s'])} "
            f"| {_cell(f['reload_s_median'])} ({f['reloads_ok']}/{f['reloads']} live, "
            f"{_cell(f.get('reloads_live_during_load'))} during the load) "
            f"| {bare_cell} | {_cell(f['rss_peak_ratio'])} "
            f"({_cell(f['rss_steady_mb'])} → {_cell(f['rss_peak_reload_mb'])} MB) "
            f"| {soak_cell} | {_cell(system.get('cpu', {}).get('other_processes_cores'))} |"
        )
    return "\n".join(lines)


POLICY_RSS_LIMITS = {"availability": 2.2, "resource": 1.2}


def targets(systems: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for hotweights, each with the measured value and whether it is
    met (reported, never asserted). A control row (a hotweights row other than a plain
    policy, e.g. `availability/batch1`) is judged on its failures and latency only."""
    rows: list[dict[str, Any]] = []
    ran = {s["name"]: s for s in systems if s["status"] == "ok"}
    peers = [s for s in ran.values() if not s["name"].startswith("hotweights/")]

    def add(target: str, value: Any, met: bool | None) -> None:
        rows.append({"target": target, "value": value, "met": met})

    def against_peers(row: str, f: dict[str, Any]) -> None:
        for peer in peers:
            pf = peer["figures"]
            add(
                f"{row}: fewer failed requests than {peer['name']} (or both none)",
                f"{f['failed']} vs {pf['failed']}",
                f["failed"] < pf["failed"] or f["failed"] == pf["failed"] == 0,
            )
            add(
                f"{row}: lower p99 ratio than {peer['name']}",
                f"{_p99(f)} vs {_p99(pf)}",
                _lt(f["p99_ratio"], pf["p99_ratio"]),
            )

    for policy, rss_limit in POLICY_RSS_LIMITS.items():
        system = ran.get(f"hotweights/{policy}")
        if system is None:
            continue
        f, soak = system["figures"], system.get("soak") or {}
        add(f"{policy}: zero failed requests", f["failed"], f["failed"] == 0)
        if policy == "availability":
            shown = f"{_p99(f)}; steady p99 {_cell(f['steady_p99_ms'], ' ms')}"
            add("availability: p99 reload ≤ 1.5x steady", shown, _le(f["p99_ratio"], 1.5))
        source = soak or f
        # Judged against the warm bare load (a user's baseline is a warm process); the cold
        # one (transformers' imports included) is shown beside it.
        reload_ratio = source["reload_vs_bare_warm"]
        shown = (
            f"{reload_ratio} (trigger to live, idle, over a warm bare load; over a cold one: "
            f"{source['reload_vs_bare_cold']}; the server's own reload alone: warm "
            f"{source.get('server_reload_vs_bare_warm')}, "
            f"cold {source.get('server_reload_vs_bare_cold')})"
        )
        add(f"{policy}: reload ≤ 1.2x warm bare load+warmup", shown, _le(reload_ratio, 1.2))
        add(
            f"{policy}: peak RSS ≤ {rss_limit}x steady",
            f["rss_peak_ratio"],
            _le(f["rss_peak_ratio"], rss_limit),
        )
        if soak:
            add(
                f"{policy}: RSS after the last 5 of {soak['reloads']} reloads ≤ 1.1x after the "
                "first 5 (medians)",
                soak["rss_last_vs_first"],
                _le(soak["rss_last_vs_first"], 1.1),
            )
        against_peers(policy, f)
    for name, system in ran.items():
        row = name.removeprefix("hotweights/")
        if row == name or row in POLICY_RSS_LIMITS:
            continue
        f = system["figures"]
        add(f"{row} (control): zero failed requests", f["failed"], f["failed"] == 0)
        shown = f"{_p99(f)}; steady p99 {_cell(f['steady_p99_ms'], ' ms')}"
        add(f"{row} (control): p99 reload ≤ 1.5x steady", shown, _le(f["p99_ratio"], 1.5))
        against_peers(f"{row} (control)", f)
    return rows


def _p99(f: dict[str, Any]) -> str:
    """A p99 ratio with the reload windows' p99 it was taken from, e.g. `1.15 (318.7 ms)`."""
    return f"{_cell(f['p99_ratio'])} ({_cell(f['reload_p99_ms'], ' ms')})"


def _le(value: Any, limit: float) -> bool | None:
    return None if value is None else bool(value <= limit)


def _lt(a: Any, b: Any) -> bool | None:
    return None if a is None or b is None else bool(a < b)


def targets_markdown(rows: Sequence[dict[str, Any]]) -> str:
    marks = {True: "met", False: "**missed**", None: "n/a"}
    lines = ["| target | measured | |", "|---|---|---|"]
    lines += [f"| {r['target']} | {_cell(r['value'])} | {marks[r['met']]} |" for r in rows]
    return "\n".join(lines)


def commit() -> str:
    """The commit the benchmark runs at (`+dirty` with uncommitted changes), for its
    result file: a reader can tell whether the code changed since."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{head}+dirty" if git("status", "--porcelain", "--untracked-files=no") else head
