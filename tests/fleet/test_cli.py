"""`hotweights fleet`'s refusals, before any Ray process starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotweights.cli import main
from hotweights.sources import publish
from tests.sources.layouts import WEIGHTS, write_files


def test_a_model_that_is_not_in_the_repository_is_refused_naming_those_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_files(tmp_path / "build", WEIGHTS)
    for model in ("a", "b"):
        publish(source, tmp_path / "repo", model)
    assert main(["fleet", "--repo", str(tmp_path / "repo"), "--model", "c"]) == 2
    assert "model 'c' is not in the repository" in (err := capsys.readouterr().err)
    assert "(models there: a, b)" in err


def test_model_must_name_a_base_model_not_an_adapter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(write_files(tmp_path / "build", WEIGHTS), tmp_path / "repo", "a")
    adapter = write_files(tmp_path / "lora", {"adapter_config.json": b"{}", "x.bin": b"1"})
    publish(adapter, tmp_path / "repo", "lora")
    assert main(["fleet", "--repo", str(tmp_path / "repo"), "--model", "lora"]) == 2
    assert "'lora' in " in (err := capsys.readouterr().err)
    assert "is a LoRA adapter: name its base model with --model" in err


def test_an_unknown_fleet_state_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(write_files(tmp_path / "build", WEIGHTS), tmp_path / "repo", "a")
    with pytest.raises(SystemExit):
        main(["fleet", "--repo", str(tmp_path / "repo"), "--fleet-state", "etcd"])
    assert "--fleet-state: invalid choice: 'etcd'" in capsys.readouterr().err


def test_an_unreadable_repository_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fleet", "--repo", str(tmp_path / "missing")]) == 2
    assert f"cannot read the model repository {tmp_path / 'missing'}" in capsys.readouterr().err


def test_no_replicas_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    publish(write_files(tmp_path / "build", WEIGHTS), tmp_path / "repo", "a")
    assert main(["fleet", "--repo", str(tmp_path / "repo"), "--replicas", "0"]) == 2
    assert "a fleet needs at least 1 replica, got 0" in capsys.readouterr().err


def test_an_exposed_endpoint_needs_an_admin_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(write_files(tmp_path / "build", WEIGHTS), tmp_path / "repo", "a")
    assert main(["fleet", "--repo", str(tmp_path / "repo"), "--host", "0.0.0.0"]) == 2
    assert "set an admin token" in capsys.readouterr().err


def test_without_a_repository_the_fleet_serves_the_one_it_is_handed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI hands `hotweights fleet` the demo's repository; the fleet imports no demo."""
    import argparse

    from hotweights.fleet.command import add_fleet_command

    publish(write_files(tmp_path / "build", WEIGHTS), tmp_path / "repo", "a")
    handed: list[str] = []

    def repository() -> tuple[Path, str]:
        handed.append("repo")
        return tmp_path / "repo", "a"

    parser = argparse.ArgumentParser()
    add_fleet_command(parser.add_subparsers(), str, repository)
    args = parser.parse_args(["fleet", "--replicas", "0"])
    assert args.run(args) == 2
    assert handed == ["repo"]
    assert "a fleet needs at least 1 replica, got 0" in capsys.readouterr().err
