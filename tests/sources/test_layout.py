from __future__ import annotations

import os
from pathlib import Path

import pytest

from hotweights.errors import EscapesRoot
from hotweights.sources import layout


@pytest.mark.parametrize(
    ("name", "number"),
    [
        ("1", 1),
        ("42", 42),
        ("0", None),
        ("007", None),
        ("-1", None),
        ("+1", None),
        ("1.0", None),
        (" 1", None),
        ("v1", None),
        ("١", None),  # an Arabic-Indic digit: isdigit() but not a version name
        ("", None),
    ],
)
def test_parse_version(name: str, number: int | None) -> None:
    assert layout.parse_version(name) == number


@pytest.mark.parametrize(
    ("name", "ignored"),
    [
        (".tmp-publish-ab12", True),
        (".git", True),
        ("3.partial", True),
        ("3.tmp", True),
        ("tmp-3", True),
        ("3~", True),
        ("3.incomplete", True),
        ("3", False),
        ("my-llm", False),
    ],
)
def test_ignored_names(name: str, ignored: bool) -> None:
    assert layout.is_ignored_name(name) is ignored


def test_locate(tmp_path: Path) -> None:
    assert layout.locate(tmp_path, str(tmp_path / "m" / "3")) == ("m", 3)
    assert layout.locate(tmp_path, str(tmp_path / "m" / "3") + "/") == ("m", 3)
    assert layout.locate(tmp_path, str(tmp_path / "m" / "03")) is None
    assert layout.locate(tmp_path, str(tmp_path / ".m" / "3")) is None
    assert layout.locate(tmp_path, str(tmp_path / "m" / "3" / "x")) is None
    assert layout.locate(tmp_path / "m", str(tmp_path / "m" / "3")) is None


def test_signature_sees_sizes_and_mtimes_hidden_files_too(tmp_path: Path) -> None:
    version = tmp_path / "m" / "1"
    (version / "sub").mkdir(parents=True)
    (version / "a").write_bytes(b"a")
    (version / "sub" / ".part").write_bytes(b"p")
    root_real = os.path.realpath(tmp_path)
    first = layout.signature(version, root_real)
    assert [name for name, _, _ in first] == ["a", "sub/.part"]
    assert layout.visible_names(first) == ["a"]
    (version / "sub" / ".part").write_bytes(b"pp")
    second = layout.signature(version, root_real)
    assert second != first
    os.utime(version / "a", ns=(1, 1))
    assert layout.signature(version, root_real) != second


def test_signature_refuses_links_out_of_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    version = root / "m" / "1"
    version.mkdir(parents=True)
    (tmp_path / "secret").write_bytes(b"s")
    (root / "inside").write_bytes(b"i")
    (version / "ok").symlink_to(root / "inside")
    layout.signature(version, os.path.realpath(root))
    (version / "bad").symlink_to(tmp_path / "secret")
    with pytest.raises(EscapesRoot, match="bad links outside"):
        layout.signature(version, os.path.realpath(root))


def test_is_within() -> None:
    assert layout.is_within("/a/b", "/a")
    assert layout.is_within("/a", "/a")
    assert not layout.is_within("/ab", "/a")
    assert layout.is_within("/x", "/")
