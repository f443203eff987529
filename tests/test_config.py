"""Settings: defaults, then HOTWEIGHTS_* variables, then flags; bad values named."""

from __future__ import annotations

import pytest

from hotweights.config import Config


def test_flags_override_the_environment_which_overrides_defaults() -> None:
    environ = {"HOTWEIGHTS_DRAIN_TIMEOUT": "7.5", "HOTWEIGHTS_POLICY": "resource"}
    config = Config.load({"policy": "availability", "port": None}, environ=environ)
    assert (config.drain_timeout, config.policy, config.port) == (7.5, "availability", 8000)


@pytest.mark.parametrize(
    ("policy", "load_in", "expected"),
    [
        ("availability", "auto", "process"),
        ("resource", "auto", "thread"),
        ("availability", "thread", "thread"),
        ("resource", "process", "process"),
    ],
)
def test_auto_loads_in_a_process_only_where_requests_run_during_the_load(
    policy: str, load_in: str, expected: str
) -> None:
    config = Config.load({"policy": policy, "load_in": load_in}, environ={})
    assert config.loads_in() == expected


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("load_in", "fork", "load_in must be one of"),
        ("policy", "fast", "policy must be one of"),
        ("max_pending", 0, "max_pending must be at least 1"),
        ("host", "0.0.0.0", "set an admin token"),
    ],
)
def test_a_bad_setting_is_named(setting: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Config.load({setting: value}, environ={})
