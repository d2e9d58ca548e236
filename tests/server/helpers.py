"""
Small builders shared by the server tests.
"""

from __future__ import annotations

from typing import Any


def legacy_job(group: str, **extra: Any) -> dict[str, Any]:
    """A job body in the flat (legacy) storage shape."""
    return {
        "command": "python",
        "arguments": ["train.py"],
        "environment": {"A": "1"},
        "input_bucket": "in",
        "input_prefix": "data",
        "checkpoint_bucket": "ck",
        "checkpoint_prefix": "run-1",
        "output_bucket": "out",
        "output_prefix": "run-1/",
        "container_group_id": group,
        **extra,
    }


def sync_job(group: str, **extra: Any) -> dict[str, Any]:
    """A job body with an empty sync block (no managed storage)."""
    return {"command": "python", "container_group_id": group, "sync": {}, **extra}


def report(machine: str, group: str, **extra: Any) -> dict[str, Any]:
    """A worker report body."""
    return {"machine_id": machine, "container_group_id": group, **extra}
