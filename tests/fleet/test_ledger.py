"""The fleet's record on disk: what is saved is what is loaded, whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotweights.fleet.ledger import (
    LEDGER_NAME,
    FleetLedger,
    Mark,
    ModelRecord,
    Pending,
    Phase,
    Record,
)
from hotweights.fleet.model_replica import Target
from hotweights.sources.version_policy import Pinned


def test_a_missing_record_reads_as_an_empty_one(tmp_path: Path) -> None:
    assert FleetLedger(tmp_path / LEDGER_NAME).load() == Record()


def test_what_is_saved_is_what_is_loaded(tmp_path: Path) -> None:
    g4, g5 = Target(4, "/r/m/2", "m v2"), Target(5, "/r/m/3", "m v3: nightly")
    record = Record(
        fleet="f",
        starts=3,
        next_generation=6,
        models={
            "m": ModelRecord(
                committed=g5,
                number=3,
                pending=Pending(g5, 3, Phase.COMMITTED, g4, "api"),
                pin=Pinned(3, "rollback"),
                bad={7: Mark("fleet cutover g3 aborted: broken", (("a", 1, 2),)), 8: Mark("x")},
                interrupted={9: 1},
            ),
            "other": ModelRecord(),
        },
    )
    ledger = FleetLedger(tmp_path / LEDGER_NAME)
    ledger.save(record)
    assert ledger.load() == record
    assert [p.name for p in tmp_path.iterdir()] == [LEDGER_NAME]  # no temporary left


@pytest.mark.parametrize(
    "text",
    ['{"format": 99}', "[]", '{"format": 1, "fleet": "f"}', "{"],
    ids=["format", "not-an-object", "incomplete", "not-json"],
)
def test_a_record_that_is_not_one_is_refused_by_name(tmp_path: Path, text: str) -> None:
    (tmp_path / LEDGER_NAME).write_text(text)
    with pytest.raises(ValueError, match=LEDGER_NAME):
        FleetLedger(tmp_path / LEDGER_NAME).load()


def test_a_failed_save_leaves_the_last_record_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = FleetLedger(tmp_path / LEDGER_NAME)
    ledger.save(Record(fleet="first"))

    def refuse(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("hotweights.fleet.ledger.os.replace", refuse)
    with pytest.raises(OSError, match="No space"):
        ledger.save(Record(fleet="second"))
    assert ledger.load().fleet == "first"
    assert [p.name for p in tmp_path.iterdir()] == [LEDGER_NAME]
