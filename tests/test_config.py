"""Settings: defaults, then HOTWEIGHTS_* variables, then flags; bad values named."""

from __future__ import annotations

from typing import get_type_hints

import pytest

from hotweights.config import AUTO_THREAD_FROM, Config
from hotweights.sources.manifest import VERIFY_MODES, VerifyMode
from hotweights.sources.watcher import WATCHER_KINDS, WatcherKind


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
def test_auto_loads_in_a_process_only_where_requests_run_during_small_loads(
    policy: str, load_in: str, expected: str
) -> None:
    config = Config.load({"policy": policy, "load_in": load_in}, environ={})
    assert config.loads_in() == expected
    assert config.thread_from() == (AUTO_THREAD_FROM if load_in == "auto" else None)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("load_in", "fork", "load_in must be one of"),
        ("policy", "fast", "policy must be one of"),
        ("max_pending", 0, "max_pending must be at least 1"),
        ("host", "0.0.0.0", "set an admin token"),
        ("canary", "10 percent", "canary must be a share like 10%"),
        ("canary", "100%", "between 0 and 1"),
        ("canary", "0", "between 0 and 1"),
        ("device", "gpu", "device must be cpu, cuda or cuda:N"),
        ("device", "cpu:0", "device must be cpu, cuda or cuda:N"),
        ("watch", "inotify", "watch must be one of"),
        ("verify", "crc", "verify must be one of"),
        ("max_batch_tokens", 8, "max_batch_tokens \\(8\\) must be at least max_batch_size"),
        ("prefill_chunk", 0, "prefill_chunk must be at least 1"),
        ("threads", -1, "threads must be 0"),
    ],
)
def test_a_bad_setting_is_named(setting: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Config.load({setting: value}, environ={})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"canary": "10%", "policy": "resource"}, "a canary needs --policy availability"),
        ({"canary": "10%", "bake": "soon"}, "bake must be a duration"),
        ({"canary": "10%", "bake": "0s"}, "bake must be positive"),
        ({"canary": "10%", "canary_max_latency_ratio": 0.5}, "max_latency_ratio must be >= 1"),
    ],
)
def test_canary_settings_are_checked_together(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Config.load(settings, environ={})


def test_canary_settings_become_a_policy() -> None:
    config = Config.load({}, environ={"HOTWEIGHTS_CANARY": "10%", "HOTWEIGHTS_BAKE": "2m"})
    policy = config.canary_policy()
    assert policy is not None
    assert (policy.share, policy.bake_seconds, policy.max_error_rate) == (0.1, 120.0, 0.05)
    assert Config.load({"canary": "0.25", "bake": "90"}, environ={}).canary_policy() == type(
        policy
    )(share=0.25, bake_seconds=90.0)
    assert Config.load({}, environ={}).canary_policy() is None


def test_the_watcher_and_verify_settings_are_the_sources_own_choices() -> None:
    """One definition of each choice: the config field is typed by the watcher's and the
    manifest's `Literal`, and accepts exactly their members."""
    hints = get_type_hints(Config)
    assert (hints["watch"], hints["verify"]) == (WatcherKind, VerifyMode)
    for kind in WATCHER_KINDS:
        assert Config.load({"watch": kind}, environ={}).watch == kind
    for mode in VERIFY_MODES:
        assert Config.load({"verify": mode}, environ={}).verify == mode


def test_the_engine_flags_reach_the_engine_settings() -> None:
    from hotweights.cli import SERVE_SETTINGS, _parser
    from hotweights.server.assembly import transformers_loader

    flags = ["serve", "m", "--max-batch-size", "8", "--max-batch-tokens", "64"]
    flags += ["--prefill-chunk", "32", "--no-prefix-cache", "--threads", "1"]
    arguments = _parser().parse_args(flags)
    config = Config.load({key: getattr(arguments, key) for key in SERVE_SETTINGS}, environ={})
    settings = transformers_loader(config).settings  # type: ignore[attr-defined]
    assert (settings.max_batch, settings.max_batch_tokens, settings.prefill_chunk) == (8, 64, 32)
    assert (settings.prefix_cache, settings.threads) == (False, 1)
