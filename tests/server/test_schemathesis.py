"""
The server against its own OpenAPI document, with Schemathesis.

Schemathesis reads /openapi.json from our server on 127.0.0.1, in this
process, generates requests from it (the coverage phase's boundary and
invalid values, fuzzing, and stateful sequences that follow the document's
links: submit a job, then read, cancel or report on it), and runs every check
on each answer: no 5xx, the status code, headers and body as documented,
schema-valid requests accepted, schema-invalid ones rejected, 405 with Allow
for other methods, and more. It runs once with the admin's key and once with
a user's key.

Reproduce (prints the counts):
``python -m pytest tests/server/test_schemathesis.py -q -s -p no:cacheprovider``
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from kelpie_sdk.testing import ServerHandle, run_server

schemathesis = pytest.importorskip("schemathesis")
GenerationMode = schemathesis.GenerationMode

pytestmark = pytest.mark.slow

#: Fuzzing examples per operation: with the coverage phase the admin's run
#: sends over 2,000 requests; the user's, without it, takes more examples.
MAX_EXAMPLES = {"admin": 5, "user": 12}
#: The fewest requests each run must have sent.
MIN_REQUESTS = {"admin": 1500, "user": 400}
#: Long polls are held up to ``wait`` seconds (60 at most); the run caps a
#: valid ``wait`` at this, so that it takes minutes, not hours.
TEST_WAIT = 0.05
SEED = 20260101
#: Steps of each stateful sequence (submit, claim, report, cancel, ...).
STATEFUL_STEPS = 50


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHandle]:
    """Our server on loopback (SQLite)."""
    with run_server() as handle:
        yield handle


def _user_key(handle: ServerHandle) -> str:
    """A fresh user's key (the admin's run deletes every user, DELETE /users)."""
    admin = {"X-Kelpie-Key": handle.admin_key}
    user = requests.post(
        f"{handle.url}/users", json={"username": "fuzz"}, headers=admin, timeout=10
    ).json()
    return str(
        requests.post(
            f"{handle.url}/users/{user['id']}/token", json={}, headers=admin, timeout=10
        ).json()["token"]
    )


def _prepare(context: Any, case: Any, **kwargs: Any) -> None:
    """Adjust a generated request just before it is sent."""
    _short_waits(case)
    _compilable_patterns(case)


def _compilable_patterns(case: Any) -> None:
    """
    In a schema-valid job, a ``sync`` pattern that Python's re module cannot
    compile becomes its escaped (literal) form.

    The server compiles patterns with Python's re module, a rule no JSON
    Schema keyword states (format "regex" is another dialect); the document
    says it in words.
    """
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return
    for body in case.body if isinstance(case.body, list) else [case.body]:
        sync = body.get("sync") if isinstance(body, dict) else None
        for entries in sync.values() if isinstance(sync, dict) else []:
            for entry in entries if isinstance(entries, list) else []:
                pattern = entry.get("pattern") if isinstance(entry, dict) else None
                if isinstance(pattern, str):
                    try:
                        re.compile(pattern)
                    except re.error:
                        entry["pattern"] = re.escape(pattern)


def _short_waits(case: Any) -> None:
    """Cap a valid long-poll ``wait``, and give ``follow=true`` a short one."""
    query = case.query
    if not isinstance(query, dict):
        return
    wait = query.get("wait")
    try:
        seconds = None if wait is None or isinstance(wait, bool) else float(wait)
    except (TypeError, ValueError):
        return
    if seconds is not None and TEST_WAIT < seconds <= 60:
        query["wait"] = TEST_WAIT
    if wait is None and str(query.get("follow", "")).lower() in ("true", "1"):
        query["wait"] = TEST_WAIT


@pytest.fixture(autouse=True)
def _short_long_polls() -> Iterator[None]:
    # before_call hooks exist only globally; removed again after each test.
    from schemathesis.hooks import GLOBAL_HOOK_DISPATCHER

    schemathesis.hook("before_call")(_prepare)
    yield
    GLOBAL_HOOK_DISPATCHER.unregister(_prepare)


def _run(
    url: str, key: str, *, coverage: bool, examples: int
) -> tuple[collections.Counter[str], list[str]]:
    """Run the phases with every check; return the answers by status, and failures."""
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "headers": {"X-Kelpie-Key": key},
            "workers": 1,
            "continue-on-failure": True,
            "request-timeout": 30,
            # The server refuses NUL in most strings (a 400 the document
            # states in words, not in every string's schema).
            "generation": {
                "max-examples": examples,
                "deterministic": True,
                "allow-x00": False,
            },
            # Every check but one: DELETE /jobs/{id} cancels a job, which
            # stays readable (the original's meaning), not a deletion.
            "checks": {"enabled": True, "use_after_free": {"enabled": False}},
            "phases": {
                "stateful": {"enabled": True, "max-steps": STATEFUL_STEPS},
                # A repeated query parameter: the server reads one of them.
                "coverage": {
                    "enabled": coverage,
                    "generate-duplicate-query-parameters": False,
                },
            },
            # A 400 that no JSON schema can rule out: a user name already
            # taken (the original's 400, kept), min_replicas above
            # max_replicas. The document says so in these 400s.
            "operations": [
                {
                    "include-path": [
                        "/users",
                        "/scaling-rules",
                        "/scaling-rules/{group}",
                    ],
                    "include-method": ["POST", "PATCH"],
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", 400, 401, 403, 404, 409]
                        }
                    },
                }
            ],
        }
    )
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)
    from schemathesis.engine import events, from_schema

    statuses: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            if event.status.value == "error":
                failures.append(f"{event.recorder.label}: error (see the log)")
            for interaction in event.recorder.interactions.values():
                response = interaction.response
                statuses["none" if response is None else str(response.status_code)] += 1
            for case_id, checks in event.recorder.checks.items():
                failures.extend(
                    _failure(event.recorder, case_id, check)
                    for check in checks
                    if check.status.value == "failure"
                )
        elif isinstance(event, events.NonFatalError | events.FatalError):
            failures.append(f"error: {event!r}")
    return statuses, failures


def _failure(recorder: Any, case_id: str, check: Any) -> str:
    """One line: the operation, the check, the request, the answer."""
    info = check.failure_info
    failure = info.failure if info is not None else None
    case = recorder.cases[case_id].value
    interaction = recorder.interactions.get(case_id)
    body = ""
    if interaction is not None and interaction.response is not None:
        body = interaction.response.content[:200].decode("utf-8", "replace")
    return (
        f"{case.method} {case.formatted_path} {check.name}: "
        f"{getattr(failure, 'title', '')} ({getattr(failure, 'message', '')[:300]}); "
        f"query={case.query!r} "
        f"body={str(case.body)[:200]!r} -> {body}"
    )


@pytest.mark.timeout(600)
@pytest.mark.parametrize("who", ["admin", "user"])
def test_the_server_keeps_its_openapi_contract(server: ServerHandle, who: str) -> None:
    """Generated requests get no 5xx and no answer that breaks the document."""
    # The coverage phase's boundary cases are the same for both keys: they
    # run once, with the admin's (which reaches every operation).
    admin = who == "admin"
    key = server.admin_key if admin else _user_key(server)
    statuses, failures = _run(
        server.url, key, coverage=admin, examples=MAX_EXAMPLES[who]
    )
    total = sum(statuses.values())
    print(
        f"\nschemathesis ({who} key): {total} requests; by status: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
        + f"; failures: {len(failures)}"
    )
    for failure in failures:
        print("  " + failure)
    assert [] == failures
    assert 0 == sum(v for k, v in statuses.items() if k.startswith("5"))
    assert 0 == statuses["none"]
    assert total >= MIN_REQUESTS[who]
    if not admin:
        # The user's key stayed valid: most answers are not 403s.
        assert statuses["403"] < total / 2
