"""
`kelpie worker` and `python -m kelpie_sdk.worker`: flags, and bad settings.
"""

from __future__ import annotations

import pytest

from kelpie_sdk.cli import main as kelpie_main
from kelpie_sdk.worker import EXIT_CONFIG, main


def test_missing_container_group_exits_2(caplog: pytest.LogCaptureFixture) -> None:
    """Without a queue the worker stops at once with the configuration exit code."""
    assert EXIT_CONFIG == main(["--api-key", "k", "--machine-id", "m"])
    assert "SALAD_CONTAINER_GROUP_ID" in caplog.text


def test_missing_credentials_exit_2(caplog: pytest.LogCaptureFixture) -> None:
    """Without an API key the worker fails fast instead of polling forever."""
    assert EXIT_CONFIG == kelpie_main(["worker", "--container-group-id", "cg"])
    assert "credentials" in caplog.text


def test_bad_slot_gpus_exit_2(caplog: pytest.LogCaptureFixture) -> None:
    """A GPU list that does not cover every slot is a configuration error."""
    argv = ["--api-key", "k", "--container-group-id", "cg", "--slots", "2"]
    assert EXIT_CONFIG == main([*argv, "--slot-gpus", "0"])
    assert "one per slot" in caplog.text
