"""
``kelpie keys create|list|revoke`` against the test server.
"""

from __future__ import annotations

import io
import json
from typing import Any

from rich.console import Console

from kelpie_sdk.cli import main


def _kelpie(url: str, key: str, *argv: str) -> tuple[int, str]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=160, color_system=None)
    code = main(["--api-url", url, "--api-key", key, *argv], console=console)
    return code, buffer.getvalue()


def test_keys_create_list_and_revoke(api_server: Any, user_key: str) -> None:
    """A user makes a worker key, sees it listed without its secret, revokes it."""
    url = api_server.url
    code, out = _kelpie(
        url, user_key, "keys", "create", "--role", "worker", "--container-group", "g1"
    )
    assert 0 == code
    secret = out.strip()
    assert secret.startswith("kelpie_w_")
    code, out = _kelpie(url, user_key, "keys", "list", "--json")
    assert 0 == code
    keys = json.loads(out)
    (worker,) = [k for k in keys if k["role"] == "worker"]
    assert ["g1"] == worker["container_groups"]
    assert secret not in out
    code, out = _kelpie(url, user_key, "keys", "list")
    assert 0 == code
    assert worker["id"] in out
    assert "g1" in out
    code, out = _kelpie(url, user_key, "keys", "revoke", worker["id"])
    assert (0, f"Revoked the API key {worker['id']}") == (code, out.strip())
    code, out = _kelpie(url, user_key, "keys", "list", "--json")
    assert worker["id"] not in [k["id"] for k in json.loads(out)]


def test_keys_create_json_shows_the_key_once(api_server: Any, user_key: str) -> None:
    """--json prints the whole answer, the secret and its expiry included."""
    code, out = _kelpie(
        api_server.url, user_key, "keys", "create", "--expires-in", "3600", "--json"
    )
    assert 0 == code
    made = json.loads(out)
    assert made["key"].startswith("kelpie_u_")
    assert made["expires"] is not None


def test_only_the_admin_makes_admin_keys(api_server: Any, user_key: str) -> None:
    """A user asking for an admin key gets an error exit."""
    code, _ = _kelpie(api_server.url, user_key, "keys", "create", "--role", "admin")
    assert 1 == code
