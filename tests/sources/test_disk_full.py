"""Publishing onto a disk that fills up: a clear error, and nothing partial left behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotweights.errors import PublishError
from hotweights.sources import ModelRepository, publish
from tests.sources.layouts import write_files

BIG = {"config.json": b"{}", "model.safetensors": b"\1" * (3 * 1024 * 1024)}


def _leftovers(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir()) if model_dir.exists() else []


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB filesystem (needs mount privileges; skipped where there are none)."""
    mountpoint = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


def test_publishing_onto_a_full_tmpfs_leaves_nothing(small_tmpfs: Path, tmp_path: Path) -> None:
    source = write_files(tmp_path / "build", BIG)
    repo = small_tmpfs / "repo"
    publish(write_files(tmp_path / "small", {"config.json": b"{}"}), repo, "m")
    with pytest.raises(PublishError, match="No space left on device"):
        publish(source, repo, "m")
    assert _leftovers(repo / "m") == ["1"]  # no version 2, no staging directory
    assert [v.number for v in ModelRepository(repo).eligible("m")] == [1]


def test_publishing_past_a_file_size_limit_leaves_nothing(tmp_path: Path) -> None:
    """The same without privileges: RLIMIT_FSIZE makes the copy fail with EFBIG midway."""
    source = write_files(tmp_path / "build", BIG)
    repo = tmp_path / "repo"
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from hotweights.errors import PublishError
        from hotweights.sources import publish
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, 1024 * 1024))
        try:
            publish({str(source)!r}, {str(repo)!r}, "m")
        except PublishError as exc:
            print(exc)
            sys.exit(3)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 3, done.stderr
    assert "File too large" in done.stdout
    assert _leftovers(repo / "m") == []
