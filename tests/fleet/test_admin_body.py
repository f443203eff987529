"""The fleet's admin bodies: what `hotweights reload` and `rollback` send is acted on or
refused by name."""

from __future__ import annotations

import pytest

from hotweights.errors import InvalidRequest
from hotweights.fleet.admin_body import AdminAsk, parse_reload, parse_rollback


@pytest.mark.parametrize(
    ("raw", "ask"),
    [
        (b"", AdminAsk()),
        (b'{"version": 3}', AdminAsk(3)),
        (b'{"description": "nightly", "wait": true}', AdminAsk(None, "nightly")),
        (b'{"model": "m", "version": 2}', AdminAsk(2, "", "m")),
    ],
)
def test_a_reload_body_is_read(raw: bytes, ask: AdminAsk) -> None:
    assert parse_reload(raw) == ask


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"path": "/models/m/3"}', 'give {"version": N}, not a path'),
        (b'{"version": "3"}', "version must be an integer, got '3'"),
        (b'{"version": true}', "version must be an integer"),
        (b'{"wait": false}', "always answers once its cutover ended"),
        (b'{"force": 1}', "unknown field 'force'; accepted: description, model, version, wait"),
        (b'{"model": 1}', "model must be a string"),
        (b"[3]", "must be a JSON object"),
        (b"{", "not JSON"),
        (b'{"description": 3}', "description must be a string"),
    ],
)
def test_a_bad_reload_body_is_named(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("{", "\\{").replace("}", "\\}")):
        parse_reload(raw)


def test_a_rollback_body_takes_a_description_and_a_model_only() -> None:
    assert parse_rollback(b'{"description": "bad eval"}') == AdminAsk(None, "bad eval")
    assert parse_rollback(b'{"model": "m"}') == AdminAsk(None, "", "m")
    with pytest.raises(InvalidRequest, match="unknown field 'version'"):
        parse_rollback(b'{"version": 2}')
