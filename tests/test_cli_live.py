"""
Tests for the live jobs table, job id prefixes, and the ``users``, ``rules``,
``jobs purge`` and ``--version`` commands, against the real server on loopback.
"""

from __future__ import annotations

import collections
import datetime as dt
import io
import re
from typing import Any

import pytest
from rich.console import Console

from kelpie_sdk import Client
from kelpie_sdk.cli import _common, _jobs, main
from kelpie_sdk.cli._live import JobsView, format_duration, live_table, plain_line
from kelpie_sdk.models import Job, WorkerReport
from tests.test_cli import Run, submit
from tests.test_client import job_json

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
JOB_IDS = [
    "0f3c9a1b-1111-4222-8333-444455556666",
    "7d6e0c2f-aaaa-4bbb-8ccc-ddddeeeeffff",
    "e1d2c3b4-0000-4000-8000-000000000000",
]


@pytest.fixture
def kelpie(api_server: Any, user_key: str) -> Run:
    """`kelpie` as a fresh user."""
    return Run(api_server.url, user_key)


def jobs() -> list[Job]:
    return [
        Job.from_json(
            job_json(
                JOB_IDS[0],
                "running",
                attempt=2,
                started="2026-01-01T00:00:00.000Z",
                progress={"step": 420, "total": 1000},
            )
        ),
        Job.from_json(job_json(JOB_IDS[1], "pending")),
        Job.from_json(
            job_json(
                JOB_IDS[2],
                "completed",
                attempt=1,
                started="2026-01-01T00:00:00.000Z",
                completed="2026-01-01T01:02:03.000Z",
            )
        ),
    ]


def render(width: int) -> list[str]:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(live_table(jobs(), width=width, now=T0 + dt.timedelta(seconds=65)))
    return [line.rstrip() for line in console.export_text().splitlines()]


@pytest.mark.parametrize("width", [80, 120])
def test_live_table_fits_the_width(width: int) -> None:
    """Status, attempt, a progress bar and the duration fit on one line per job."""
    lines = render(width)
    assert all(len(line) <= width for line in lines)
    header, _, running, pending, completed = lines
    assert header.split() == ["ID", "Status", "Attempt", "Progress", "Duration"]
    assert re.search(r"running +2 +█+░+ 42% step 420/1000 +1m05s$", running)
    assert re.search(r"pending$", pending)
    assert re.search(r"completed +1 +█+ 100% +1h02m$", completed)


def test_live_table_shortens_ids_only_when_narrow() -> None:
    """At 120 columns ids are whole; at 80 their first 8 characters are shown."""
    assert render(120)[2].split()[0] == JOB_IDS[0]
    narrow = render(80)
    assert [line.split()[0] for line in narrow[2:]] == [i[:8] for i in JOB_IDS]


def test_plain_line_and_durations() -> None:
    """A plain line names id, status, attempt, progress and duration."""
    now = T0 + dt.timedelta(seconds=65)
    assert f"{JOB_IDS[0]} running attempt 2 42% step 420/1000 1m05s" == plain_line(
        jobs()[0], now
    )
    assert f"{JOB_IDS[1]} pending" == plain_line(jobs()[1], now)
    assert ["0s", "59s", "1m00s", "59m59s", "1h00m", "1d00h"] == [
        format_duration(s) for s in (0, 59, 60, 3599, 3600, 86400)
    ]


def test_view_prints_lines_on_change_when_not_a_terminal() -> None:
    """Off a terminal nothing is redrawn: a line per job whose state changed."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=80)
    assert not console.is_terminal
    first = jobs()
    later = [
        Job.from_json(
            job_json(
                JOB_IDS[0], "running", attempt=2, progress={"step": 500, "total": 1000}
            )
        ),
        first[1],
        first[2],
    ]
    with JobsView(console, now=lambda: T0) as view:
        view.update(first)
        view.update(first)
        view.update(later)
    lines = buffer.getvalue().splitlines()
    assert 4 == len(lines)
    assert lines[3] == f"{JOB_IDS[0]} running attempt 2 50% step 500/1000"
    assert "\x1b" not in buffer.getvalue()


def test_view_redraws_in_a_terminal() -> None:
    """On a terminal the table is drawn by rich Live and left on screen."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, force_terminal=True, color_system=None)
    with JobsView(console, now=lambda: T0 + dt.timedelta(seconds=65)) as view:
        view.update(jobs()[:1])
        view.update(jobs())
    text = buffer.getvalue()
    assert "\x1b[" in text  # cursor movement: redrawn in place
    last = text.rsplit("Duration", 1)[1]
    for job_id in JOB_IDS:
        assert job_id[:8] in last
    assert "1m05s" in last


# -- the commands ----------------------------------------------------------------


def running(client: Client, job_id: str, group: str, **progress: Any) -> None:
    claimed = client.claim_work(machine_id="m", container_group_id=group)
    assert claimed is not None
    assert claimed.id == job_id
    client.heartbeat(
        job_id,
        WorkerReport(
            machine_id="m",
            container_group_id=group,
            attempt=claimed.attempt,
            progress=progress,
        ),
    )


def test_jobs_wait_prints_lines_then_the_table(
    kelpie: Run,
    client: Client,
    container_group_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Off a terminal, wait prints each change as a line, then the final table."""
    [job_id] = submit(client, container_group_id)
    running(client, job_id, container_group_id, step=1, total=4)
    polls = collections.Counter[str]()

    def sleep(seconds: float) -> None:
        polls["n"] += 1
        client.report_completed(
            job_id,
            WorkerReport(
                machine_id="m", container_group_id=container_group_id, attempt=1
            ),
        )

    def make_client(url: str | None, key: str | None) -> Client:
        return Client(url, key, sleep=sleep)

    monkeypatch.setattr(_common, "Client", make_client)
    assert 0 == kelpie("jobs", "wait", job_id[:8])
    lines = kelpie.out.splitlines()
    assert lines[0].startswith(f"{job_id} running attempt 1 25% step 1/4")
    assert lines[1].startswith(f"{job_id} completed attempt 1 25% step 1/4")
    assert "Progress" in lines[2]
    assert 1 == polls["n"]


def test_jobs_wait_live_in_a_terminal(
    api_server: Any, user_key: str, client: Client, container_group_id: str
) -> None:
    """In a terminal at 80 columns, wait draws the live table."""
    [job_id] = submit(client, container_group_id)
    client.cancel(job_id)
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, force_terminal=True, color_system=None)
    code = main(
        ["--api-url", api_server.url, "--api-key", user_key, "jobs", "wait", job_id],
        console=console,
    )
    assert 1 == code
    text = buffer.getvalue()
    for part in (job_id[:8], "canceled", "Attempt"):
        assert part in text
    assert all(
        len(line) <= 80
        for line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).splitlines()
    )


def test_jobs_list_watch(
    kelpie: Run,
    client: Client,
    container_group_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--watch polls until Ctrl-C (exit 0), printing a line per change off a terminal."""
    [job_id] = submit(client, container_group_id)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 1:
            running(client, job_id, container_group_id, percent=10)
        elif len(sleeps) == 2:
            pass  # nothing changes: no line
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(_jobs, "_sleep", sleep)
    assert 0 == kelpie("jobs", "list", "--watch", "--interval", "0.5")
    assert [0.5, 0.5, 0.5] == sleeps
    lines = kelpie.out.splitlines()
    assert [f"{job_id} pending", f"{job_id} running attempt 1 10%"] == [
        re.sub(r" \d+s$", "", line) for line in lines
    ]


def test_jobs_list_watch_with_json_is_a_usage_error(kelpie: Run) -> None:
    """--watch draws a table, so --json is refused."""
    assert 2 == kelpie("jobs", "list", "--watch", "--json")


def test_job_id_prefixes(
    kelpie: Run,
    client: Client,
    container_group_id: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """get, cancel and wait take a unique prefix; a shared or unknown one is an error."""
    ids = submit(client, container_group_id, 17)  # two share a first character
    assert 0 == kelpie("jobs", "get", ids[0][:10], "--json")
    assert ids[0] == kelpie.json()["id"]
    assert 0 == kelpie("jobs", "cancel", ids[1][:6], "--json")
    assert {"canceled": [ids[1]]} == kelpie.json()
    assert 1 == kelpie("jobs", "wait", ids[1][:6])  # canceled, so exit 1

    first = collections.Counter(i[0] for i in ids).most_common(1)[0][0]
    shared = sorted(i for i in ids if i[0] == first)
    capsys.readouterr()
    assert 1 == kelpie("jobs", "get", first)
    err = capsys.readouterr().err
    assert f"Error: '{first}' is the start of several job ids (" in err
    assert all(i in err for i in shared[:10])
    assert 1 == kelpie("jobs", "get", "zzz")
    assert "Error: no job id starts with 'zzz'" in capsys.readouterr().err


def test_prefixes_do_not_reach_other_users(
    api_server: Any, admin_client: Client, client: Client, container_group_id: str
) -> None:
    """Another user's job is not found by its prefix."""
    [job_id] = submit(client, container_group_id)
    other = admin_client.create_user("prefix-other-" + job_id)
    key = admin_client.create_token(other.id)
    run = Run(api_server.url, key)
    assert 1 == run("jobs", "get", job_id[:8])


def test_jobs_purge(
    kelpie: Run,
    client: Client,
    container_group_id: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """purge needs --yes, then deletes pending jobs and cancels running ones."""
    ids = submit(client, container_group_id, 3)
    assert 2 == kelpie("jobs", "purge", "--container-group-id", container_group_id)
    assert "add --yes" in capsys.readouterr().err
    assert 3 == len(list(client.list_jobs(container_group_id=container_group_id)))
    running(client, ids[0], container_group_id)
    assert 0 == kelpie(
        "jobs", "purge", "--container-group-id", container_group_id, "--yes"
    )
    assert f"Purged 3 job(s) of container group {container_group_id}" in kelpie.out
    left = list(client.list_jobs(container_group_id=container_group_id))
    assert [(ids[0], "canceled")] == [(j.id, j.status.value) for j in left]
    assert 0 == kelpie(
        "jobs", "purge", "--container-group-id", container_group_id, "--yes", "--json"
    )
    assert {"container_group_id": container_group_id, "count": 0} == kelpie.json()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the package version."""
    from importlib.metadata import version

    assert 0 == main(["--version"])
    assert f"kelpie {version('kelpie-sdk')}\n" == capsys.readouterr().out


def test_users(api_server: Any, kelpie: Run) -> None:
    """The admin creates a user and a key; the key works; others may not create."""
    admin = Run(api_server.url, api_server.admin_key)
    name = "cli-user-" + kelpie.key[-8:]
    assert 0 == admin("users", "create", name, "--token", "--org-name", "o", "--json")
    created = admin.json()
    assert name == created["username"]
    assert 0 == admin("users", "token", created["id"])
    key = admin.out.strip()
    assert re.fullmatch(r"\S+", key)
    me = Run(api_server.url, key)
    assert 0 == me("users", "me", "--json")
    assert created["id"] == me.json()["id"]
    assert 0 == me("users", "me")
    assert name in me.out
    assert 0 == Run(api_server.url, created["token"])("users", "me")
    assert 1 == kelpie("users", "create", "nobody")  # not the admin


def test_rules(kelpie: Run, container_group_id: str) -> None:
    """Scaling rules: create, list, get, update, delete."""
    assert 0 == kelpie("rules", "list")
    assert "No scaling rules." in kelpie.out
    assert 0 == kelpie(
        "rules", "create", container_group_id, "--min-replicas", "0",
        "--max-replicas", "3", "--idle-threshold-seconds", "60", "--json",
    )  # fmt: skip
    assert (0, 3, 60) == tuple(
        kelpie.json()[k]
        for k in ("min_replicas", "max_replicas", "idle_threshold_seconds")
    )
    assert 0 == kelpie("rules", "list")
    assert container_group_id in kelpie.out
    assert "Idle (s)" in kelpie.out
    assert 0 == kelpie(
        "rules", "update", container_group_id, "--max-replicas", "5", "--json"
    )
    assert 5 == kelpie.json()["max_replicas"]
    assert 2 == kelpie("rules", "update", container_group_id)
    assert 0 == kelpie("rules", "get", container_group_id, "--json")
    assert 5 == kelpie.json()["max_replicas"]
    assert 0 == kelpie("rules", "delete", container_group_id)
    assert f"Deleted the scaling rule of {container_group_id}" in kelpie.out
    assert 1 == kelpie("rules", "get", container_group_id)
