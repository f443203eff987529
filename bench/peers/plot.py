"""The PNG: latency over time, one subplot per system, each request coloured by the version
that answered it, failures as red crosses, reload windows shaded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot(systems: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Draw every system that ran; None when matplotlib is missing or nothing ran."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ran = [s for s in systems if s["status"] == "ok"]
    if not ran:
        return None
    figure: Any
    figure, axes = plt.subplots(
        len(ran), 1, figsize=(12, 2.6 * len(ran)), sharex=True, squeeze=False
    )
    palette: Any = plt.get_cmap("tab10")
    for ax, system in zip(axes[:, 0], ran, strict=True):
        records = system["records"]
        for reload in system["reloads"]:
            ax.axvspan(reload["trigger"], reload["window_end"], color="0.85", zorder=0)
        versions = sorted({r["version"] for r in records if r["outcome"] == "ok"}, key=str)
        for version in versions:
            mine = [r for r in records if r["outcome"] == "ok" and r["version"] == version]
            color = "0.3" if version is None else palette((int(version) - 1) % 10)
            weights = mine[0]["weights"] if mine else "?"
            ax.scatter(
                [r["start"] for r in mine],
                [r["latency_ms"] for r in mine],
                s=6,
                color=color,
                label=f"v{version} ({weights})",
                zorder=2,
            )
        failed = [r for r in records if r["outcome"] != "ok"]
        if failed:
            ax.scatter(
                [r["start"] for r in failed],
                [max(r["latency_ms"], 1.0) for r in failed],
                marker="x",
                color="red",
                s=20,
                label=f"failed ({len(failed)})",
                zorder=3,
            )
        f = system["figures"]
        ax.set_title(
            f"{system['name']}: {f['failed']} failed of {f['requests']}, p99 "
            f"{f['steady_p99_ms']} ms steady, {f['reload_p99_ms']} ms in reload windows",
            fontsize=9,
            loc="left",
        )
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.legend(fontsize=7, loc="upper right", ncol=min(8, len(versions) + 1), markerscale=2)
        ax.grid(True, which="major", axis="y", alpha=0.3)
    axes[-1, 0].set_xlabel("request start (s since the load began); grey: reload windows")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
