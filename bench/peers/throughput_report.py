"""The throughput benchmark's targets (issue #22) and its markdown report.

Every target is a ratio of two figures from the same run: hotweights' over a peer's, or
inside reload windows over steady. A target whose figures are missing (a peer that was
skipped or failed) is `n/a`, never met.
"""

from __future__ import annotations

from typing import Any

LLAMA = "llama.cpp"
TRANSFORMERS = ("transformers-cb", "transformers-cb-tuned")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of (target, ratio, limit, met) for `report` (see `throughput.py`)."""
    systems: dict[str, dict[str, Any]] = report["systems"]
    hw = systems.get("hotweights", {})
    llama = systems.get(LLAMA, {})
    rows: list[dict[str, Any]] = []

    def add(target: str, value: float | None, limit: float, at_least: bool) -> None:
        met = None if value is None else (value >= limit if at_least else value <= limit)
        sign = "≥" if at_least else "≤"
        rows.append({"target": f"{target} {sign} {limit}", "value": value, "met": met})

    def figure(rows_of: dict[str, Any], key: str, name: str) -> float | None:
        value = rows_of.get(key, {}).get(name)
        return float(value) if value is not None else None

    for clients in (16, 32):
        key = f"stream-{clients}"
        ours = figure(hw, key, "tokens_per_s")
        add(
            f"tokens/s vs llama.cpp, {clients} streams",
            _ratio(ours, figure(llama, key, "tokens_per_s")),
            1.0,
            True,
        )
        best = max(
            (
                v
                for name in TRANSFORMERS
                if (v := figure(systems.get(name, {}), key, "tokens_per_s"))
            ),
            default=None,
        )
        add(f"tokens/s vs transformers' best, {clients} streams", _ratio(ours, best), 1.5, True)
    for clients in (4, 16, 32):
        key = f"stream-{clients}"
        ratio = _ratio(figure(hw, key, "ttft_p50_s"), figure(llama, key, "ttft_p50_s"))
        add(f"TTFT p50 vs llama.cpp, {clients} streams", ratio, 1.5, False)
    ratio = _ratio(figure(hw, "stream-16", "gap_p99_s"), figure(llama, "stream-16", "gap_p99_s"))
    add("gap p99 vs llama.cpp, 16 streams", ratio, 1.5, False)
    reloads = report.get("reloads") or {}
    if reloads:
        add("reloads: failed requests", float(reloads["failed"]), 0, False)
        add("reloads: streams that saw two generations", float(reloads["mixed_streams"]), 0, False)
        add("reloads: gap p99 in reload windows / steady", reloads.get("gap_p99_ratio"), 1.5, False)
    return rows


def _num(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def _same(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """How much of two answers' text agrees. Token bytes from logprobs do not compare
    across servers: for a token that is not whole UTF-8, llama-server reports its raw
    byte, hotweights the bytes of U+FFFD; and a server may hold back a trailing partial
    character at the end of a completion."""
    a, b = ours.get("text"), theirs.get("text")
    if a is None or b is None:
        return "–"
    if a == b:
        return f"yes, all {len(a)} characters"
    common = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    same = min(len(a), len(b)) if common is None else common
    return f"first {same} characters equal (lengths {len(a)}, {len(b)})"


def markdown(report: dict[str, Any], targets_rows: list[dict[str, Any]]) -> str:
    systems: dict[str, dict[str, Any]] = report["systems"]
    lines = [
        "# Throughput: hotweights, llama.cpp `llama-server`, `transformers serve`",
        "",
        f"Measured at {report['commit']} on {report['date']}; {report['machine']['cpus']} "
        f"CPUs. {report['model']}. {report['tokens']} greedy tokens per request; "
        "closed-loop clients, one server at a time. Produced by "
        f"`{report['command']}`.",
        "",
        "Systems:",
        "",
    ]
    lines += [f"- **{name}**: {about}" for name, about in report["about"].items()]
    lines += [
        "",
        "*Busy before*: cores the rest of the machine kept busy just before a level began "
        "(the benchmark waits up to `--quiet-wait` seconds for under 0.3); a level that "
        "began on a busy machine measured the other work too.",
    ]
    if report.get("unavailable"):
        lines += ["", "Not measured:", ""]
        lines += [f"- {name}: {why}" for name, why in report["unavailable"].items()]
    for mode, title in (("stream", "Streamed"), ("plain", "Non-streamed")):
        lines += [
            "",
            f"## {title}",
            "",
            "| clients | system | tok/s | tokens/request | TTFT p50 / p99 s "
            "| gap p50 / p99 ms | request p50 s | peak RSS MB | failed | busy before |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for clients in report["concurrency"]:
            for name, rows in systems.items():
                row = rows.get(f"{mode}-{clients}")
                if row is None:
                    continue
                lines.append(
                    f"| {clients} | {name} | {_num(row['tokens_per_s'], digits=1)} "
                    f"| {_num(row['tokens_per_request'], digits=1)} "
                    f"| {_num(row['ttft_p50_s'])} / {_num(row['ttft_p99_s'])} "
                    f"| {_num(row['gap_p50_s'], 1000, 0)} / {_num(row['gap_p99_s'], 1000, 0)} "
                    f"| {_num(row['latency_p50_s'])} | {_num(row['peak_rss_mb'], digits=0)} "
                    f"| {row['failed']} / {row['requests']} "
                    f"| {_num(row.get('busy_cores_before'), digits=1)} |"
                )
    failures = [
        f"- {name} {key}: {'; '.join(row['errors'])}"
        for name, rows in systems.items()
        for key, row in rows.items()
        if row.get("errors")
    ]
    if failures:
        lines += ["", "Why requests failed (up to three distinct reasons per row):", "", *failures]
    agreement = report.get("agreement") or {}
    if agreement:
        lines += [
            "",
            "## Same prompt, same answer?",
            "",
            "One greedy request per system for the first prompt: the prompt tokens each "
            "server counted (the chat template applied), and how much of its text equals "
            "hotweights' (random weights answer mostly U+FFFD, but the characters that "
            "decode, and where, show whether the greedy tokens agree).",
            "",
            "| system | prompt tokens | completion tokens | same as hotweights |",
            "|---|---|---|---|",
        ]
        ours = agreement.get("hotweights", {})
        for name, seen in agreement.items():
            lines.append(
                f"| {name} | {seen['prompt_tokens']} | {seen['completion_tokens']} "
                f"| {'–' if name == 'hotweights' else _same(ours, seen)} |"
            )
    reloads = report.get("reloads")
    if reloads:
        lines += [
            "",
            "## Reloads under load (hotweights)",
            "",
            f"{reloads['streams']} closed-loop streams, {reloads['reloads']} reloads "
            f"alternating two weight sets: {reloads['requests']} requests, "
            f"{reloads['failed']} failed, {reloads['mixed_streams']} streams saw two "
            f"generations; gap p99 {_num(reloads['gap_p99_steady_s'], 1000, 0)} ms steady, "
            f"{_num(reloads['gap_p99_reload_s'], 1000, 0)} ms in reload windows "
            f"({_num(reloads['gap_p99_ratio'])}x); windows {reloads['reload_window_s']} s.",
        ]
    marks = {True: "MET", False: "**MISSED**", None: "n/a"}
    lines += ["", "## Targets (issue #22)", "", "| target | measured | |", "|---|---|---|"]
    lines += [
        f"| {row['target']} | {_num(row['value'])} | {marks[row['met']]} |" for row in targets_rows
    ]
    return "\n".join(lines) + "\n"
