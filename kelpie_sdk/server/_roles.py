"""
Which key roles may call which route.

Every route handler carries its decision in ``opt={"access": ...}``: a tuple
of the roles allowed, or ``"public"`` for a route that needs no key. A route
without a decision is refused to every key (see ``_app._authenticate``), and
a test walks every route of the application against a table of the expected
decisions, so a new route cannot slip through undecided.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = [
    "ACCESS_ADMIN",
    "ACCESS_ANY",
    "ACCESS_PUBLIC",
    "ACCESS_USERS",
    "Access",
]

Access = tuple[str, ...] | Literal["public"]

#: Every key: the worker protocol (claim, heartbeat, report, ship logs).
ACCESS_ANY: Final[dict[str, Access]] = {"access": ("admin", "user", "worker")}
#: Admin and user keys: submitting, reading, cancelling, scaling rules, keys.
ACCESS_USERS: Final[dict[str, Access]] = {"access": ("admin", "user")}
#: Admin keys only.
ACCESS_ADMIN: Final[dict[str, Access]] = {"access": ("admin",)}
#: No key needed (health checks, the API's documentation, the sign-in page).
ACCESS_PUBLIC: Final[dict[str, Access]] = {"access": "public"}
