"""`hotweights reload | rollback | promote | status` without a server to call."""

from __future__ import annotations

import pytest

from hotweights.cli import main
from hotweights.testing import free_port


@pytest.mark.parametrize(
    "command", [["status"], ["promote"], ["rollback"], ["reload", "--no-wait"]]
)
def test_an_unreachable_server_is_named_with_exit_code_3(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main([*command, "--url", url]) == 3
    assert f"cannot reach {url}" in capsys.readouterr().err
