"""
Tests for the ``kelpie`` command line, against the real server on loopback.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from kelpie_sdk import Client, JobStatus
from kelpie_sdk.cli import main
from kelpie_sdk.cli._common import format_progress
from kelpie_sdk.models import LEGACY_STORAGE_FIELDS, WorkerReport
from tests.fault_server import closed_port_url_fixture  # noqa: F401 (fixture)


class Run:
    """Runs `kelpie` in-process against the test server and keeps the output."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.key = key
        self.out = ""

    def __call__(self, *argv: str, auth: bool = True) -> int:
        buffer = io.StringIO()
        console = Console(file=buffer, width=120, color_system=None)
        prefix = ["--api-url", self.url, "--api-key", self.key] if auth else []
        code = main([*prefix, *argv], console=console)
        self.out = buffer.getvalue()
        return code

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def kelpie(api_server: Any, user_key: str) -> Run:
    """`kelpie` as a fresh user."""
    return Run(api_server.url, user_key)


def submit(client: Client, group: str, n: int = 1) -> list[str]:
    """Queue n jobs and return their ids."""
    jobs = client.submit_jobs(
        [
            {"command": f"c{i}", "container_group_id": group, "sync": {}}
            for i in range(n)
        ]
    )
    return [j.id for j in jobs]


def test_submit_from_flags(
    kelpie: Run, client: Client, container_group_id: str
) -> None:
    """Flags describe one job; --json prints exactly that job."""
    code = kelpie(
        "submit",
        "--command",
        "python",
        "--arg",
        "train.py",
        "--arg=--fast",
        "--env",
        "A=1",
        "--env",
        "B=x=y",
        "--container-group-id",
        container_group_id,
        "--max-failures",
        "4",
        "--heartbeat-interval",
        "15",
        "--json",
    )
    assert 0 == code
    data = kelpie.json()
    job = client.get_job(data["id"])
    assert job.to_json() == data
    assert (("train.py", "--fast"), {"A": "1", "B": "x=y"}, 4, 15, {}) == (
        job.arguments,
        job.environment,
        job.max_failures,
        job.heartbeat_interval,
        data["sync"],
    )


def _docstring_command(path: Path) -> list[str]:
    """The `kelpie submit ...` line of an example's docstring, as arguments."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("kelpie submit"):
            return line.split()[1:]
    raise AssertionError(f"no kelpie submit line in {path}")


def test_submit_command_after_double_dash(
    kelpie: Run, client: Client, container_group_id: str
) -> None:
    """The exact line of examples/jobs/count.py's docstring submits its command."""
    argv = _docstring_command(Path(__file__).parent.parent / "examples/jobs/count.py")
    assert ["submit", "--container-group-id", "local", "--"] == argv[:4]
    argv[2] = container_group_id
    assert 0 == kelpie(*argv)
    [job] = client.list_jobs(container_group_id=container_group_id)
    assert ("python", ("examples/jobs/count.py",), {}) == (
        job.command,
        job.arguments,
        job.environment,
    )


def test_submit_double_dash_keeps_dashes_and_json(
    kelpie: Run, client: Client, container_group_id: str
) -> None:
    """After `--`, words that start with `-` are arguments; --json goes before it."""
    code = kelpie(
        "submit",
        "--container-group-id",
        container_group_id,
        "--env",
        "A=1",
        "--json",
        "--",
        "python",
        "-c",
        "print(1)",
        "--json",
    )
    assert 0 == code
    job = client.get_job(kelpie.json()["id"])
    assert ("python", ("-c", "print(1)", "--json"), {"A": "1"}) == (
        job.command,
        job.arguments,
        job.environment,
    )


def test_submit_with_sync_json(kelpie: Run, container_group_id: str) -> None:
    """--sync-json sets the sync block."""
    sync = {
        "before": [
            {"bucket": "b", "prefix": "p", "local_path": "/in", "direction": "download"}
        ]
    }
    code = kelpie(
        "submit",
        "--command",
        "x",
        "--container-group-id",
        container_group_id,
        "--sync-json",
        json.dumps(sync),
        "--json",
    )
    assert 0 == code
    assert "p/" == kelpie.json()["sync"]["before"][0]["prefix"]


def test_submit_with_legacy_flags(kelpie: Run, container_group_id: str) -> None:
    """The bucket/prefix flags give a legacy-storage job."""
    flags = []
    for kind in ("input", "checkpoint", "output"):
        flags += [f"--{kind}-bucket", "b", f"--{kind}-prefix", kind]
    code = kelpie(
        "submit", "--command", "x", "--container-group-id", container_group_id,
        *flags, "--json",
    )  # fmt: skip
    assert 0 == code
    data = kelpie.json()
    assert (None, "input/") == (data["sync"], data["input_prefix"])


def test_submit_human_output(kelpie: Run, container_group_id: str) -> None:
    """Without --json a table of the submitted job is shown."""
    code = kelpie(
        "submit", "--command", "x", "--container-group-id", container_group_id
    )
    assert 0 == code
    assert "Submitted 1 job(s)" in kelpie.out
    assert "pending" in kelpie.out


def test_submit_array_file_is_a_batch(
    kelpie: Run, client: Client, container_group_id: str, tmp_path: Path
) -> None:
    """A file holding an array submits a batch in order; the group may come from flags."""
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps([{"command": f"c{i}", "sync": {}} for i in range(3)]))
    code = kelpie(
        "submit", str(path), "--container-group-id", container_group_id, "--json"
    )
    assert 0 == code
    assert ["c0", "c1", "c2"] == [j["command"] for j in kelpie.json()]
    listed = client.list_jobs(container_group_id=container_group_id, asc=True)
    assert ["c0", "c1", "c2"] == [j.command for j in listed]


def test_submit_object_from_stdin(
    kelpie: Run, container_group_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`-` reads one job object from stdin."""
    body = {"command": "x", "container_group_id": container_group_id, "sync": {}}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(body)))
    assert 0 == kelpie("submit", "-", "--json")
    assert "pending" == kelpie.json()["status"]


def test_submit_invalid_file_job_is_an_error(
    kelpie: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server-rejected batch gives exit 1 and one Error line on stderr."""
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps([{"command": "x", "container_group_id": "g"}]))
    assert 1 == kelpie("submit", str(path))
    err = capsys.readouterr().err
    assert err.startswith("Error: 400 POST /jobs/batch")
    assert 1 == len(err.strip().splitlines())
    assert "" == kelpie.out


def test_submit_file_names_the_bad_job(
    kelpie: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a file of many jobs, the error line names the rejected job's index."""
    good = {"command": "x", "container_group_id": "g", "sync": {}}
    jobs = [good] * 40 + [{"command": "x", "container_group_id": "g", "sync": 5}]
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs + [good] * 3))
    assert 1 == kelpie("submit", str(path))
    err = capsys.readouterr().err
    assert err.startswith("Error: 400 POST /jobs/batch: job at index 40: ")
    assert 1 == len(err.strip().splitlines())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "Error: invalid JSON"),
        ("[]", "Error: the file holds an empty array"),
        ("[1]", "Error: job 0 in the file is not a JSON object"),
        ('{"command": 1}', "Error: JobSubmission: field 'command'"),
    ],
)
def test_submit_bad_files(
    kelpie: Run,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str,
    message: str,
) -> None:
    """Unusable job files give exit 1 with a message naming the problem."""
    path = tmp_path / "job.json"
    path.write_text(content)
    assert 1 == kelpie("submit", str(path))
    assert capsys.readouterr().err.startswith(message)


def test_submit_missing_file(
    kelpie: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that does not exist gives exit 1."""
    assert 1 == kelpie("submit", str(tmp_path / "nope.json"))
    assert "No such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["submit"], "give a FILE"),
        (["submit", "--command", "x"], "--container-group-id is required"),
        (["submit", "f.json", "--command", "x"], "not both (--command)"),
        (["submit", "f.json", "--arg", "x"], "not both (--arg)"),
        (
            [
                "submit",
                "--command",
                "x",
                "--container-group-id",
                "g",
                "--sync-json",
                "{",
            ],
            "--sync-json is not valid JSON",
        ),
        (
            [
                "submit",
                "--command",
                "x",
                "--container-group-id",
                "g",
                "--sync-json",
                "[]",
            ],
            "--sync-json must be a JSON object",
        ),
        (
            ["submit", "--container-group-id", "g", "--command", "x", "--", "y"],
            "give the command either after -- or with --command/--arg, not both",
        ),
        (
            ["submit", "job.json", "--", "python"],
            "give either FILE or a command after --, not both",
        ),
        (["submit", "--container-group-id", "g", "--"], "nothing after --"),
        (["jobs", "list", "--", "x"], "kelpie jobs list takes no arguments after --"),
    ],
)
def test_submit_usage_errors(
    kelpie: Run, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """Contradictory or missing submit arguments are usage errors (exit 2)."""
    assert 2 == kelpie(*argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["jobs"],
        ["jobs", "list", "--status", "sleeping"],
        ["jobs", "list", "--limit", "-1"],
        ["jobs", "list", "--page-size", "0"],
        ["submit", "--command", "x", "--env", "NOEQUALS"],
        ["nonsense"],
    ],
)
def test_argparse_usage_errors(kelpie: Run, argv: list[str]) -> None:
    """Arguments argparse rejects give exit 2."""
    assert 2 == kelpie(*argv)


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """--help prints usage and exits 0."""
    assert 0 == main(["jobs", "list", "--help"])
    assert "--status" in capsys.readouterr().out


def test_jobs_list_table_with_progress(
    kelpie: Run, client: Client, container_group_id: str
) -> None:
    """The table shows id, status, group, failures, heartbeats and progress."""
    [job_id] = submit(client, container_group_id)
    claimed = client.claim_work(machine_id="m", container_group_id=container_group_id)
    assert claimed is not None
    report = WorkerReport(
        machine_id="m",
        container_group_id=container_group_id,
        attempt=claimed.attempt,
        progress={"step": 420, "total": 1000},
    )
    client.heartbeat(job_id, report)
    assert 0 == kelpie("jobs", "list")
    for text in (job_id, "running", "0/3", "42% step 420/1000", "Heartbeats"):
        assert text in kelpie.out


def test_jobs_list_json_filters_and_limit(
    kelpie: Run, client: Client, container_group_id: str
) -> None:
    """--json lists jobs as a JSON array; filters, --asc and --limit apply."""
    ids = submit(client, container_group_id, 5)
    client.cancel(ids[0])
    assert 0 == kelpie(
        "jobs", "list", "--container-group-id", container_group_id, "--asc",
        "--limit", "3", "--page-size", "2", "--json",
    )  # fmt: skip
    assert ids[:3] == [j["id"] for j in kelpie.json()]
    assert 0 == kelpie("jobs", "list", "--status", "canceled", "--json", "--limit", "0")
    assert [ids[0]] == [j["id"] for j in kelpie.json()]


def test_jobs_list_empty(kelpie: Run) -> None:
    """An empty listing says so."""
    assert 0 == kelpie("jobs", "list")
    assert "No jobs." in kelpie.out


def test_jobs_get(kelpie: Run, client: Client, container_group_id: str) -> None:
    """get shows one job's fields; --json is the wire form."""
    [job_id] = submit(client, container_group_id)
    assert 0 == kelpie("jobs", "get", job_id)
    assert job_id in kelpie.out
    assert "c0" in kelpie.out
    assert 0 == kelpie("jobs", "get", job_id, "--json")
    assert client.get_job(job_id).to_json() == kelpie.json()


def test_jobs_get_shows_worker_fields(
    kelpie: Run, client: Client, container_group_id: str
) -> None:
    """get shows timestamps, attempt, progress, last error, storage and webhook."""
    job = client.submit_job(
        command="x",
        container_group_id=container_group_id,
        environment={"SECRET_TOKEN": "hidden"},
        webhook="http://127.0.0.1:9/hook",
        **{f: "b" if f.endswith("bucket") else "p" for f in LEGACY_STORAGE_FIELDS},
    )
    claimed = client.claim_work(machine_id="m", container_group_id=container_group_id)
    assert claimed is not None
    report = WorkerReport(
        machine_id="m",
        container_group_id=container_group_id,
        attempt=claimed.attempt,
        progress={"message": "warming up"},
        error="disk full",
    )
    client.heartbeat(job.id, report)
    client.report_failed(job.id, report)
    assert 0 == kelpie("jobs", "get", job.id)
    for text in (
        "started",
        "attempt",
        "warming up",
        "disk full",
        "SECRET_TOKEN",
        "checkpoint prefix",
        "http://127.0.0.1:9/hook",
    ):
        assert text in kelpie.out
    assert "hidden" not in kelpie.out


def test_jobs_get_unknown(kelpie: Run, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown job gives exit 1 and `Error: 404 ...` on stderr."""
    job_id = str(uuid.uuid4())
    assert 1 == kelpie("jobs", "get", job_id)
    assert capsys.readouterr().err.startswith(f"Error: 404 GET /jobs/{job_id}")


def test_debug_shows_traceback(kelpie: Run, capsys: pytest.CaptureFixture[str]) -> None:
    """--debug adds the traceback before the Error line."""
    assert 1 == kelpie("--debug", "jobs", "get", str(uuid.uuid4()))
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert "Error: 404" in err


def test_jobs_cancel(kelpie: Run, client: Client, container_group_id: str) -> None:
    """cancel cancels every id given."""
    ids = submit(client, container_group_id, 2)
    assert 0 == kelpie("jobs", "cancel", *ids)
    assert all(f"Canceled {i}" in kelpie.out for i in ids)
    statuses = {client.get_job(i).status for i in ids}
    assert {JobStatus.CANCELED} == statuses


def test_jobs_cancel_json(kelpie: Run, client: Client, container_group_id: str) -> None:
    """cancel --json prints the canceled ids."""
    ids = submit(client, container_group_id, 1)
    assert 0 == kelpie("jobs", "cancel", *ids, "--json")
    assert {"canceled": ids} == kelpie.json()


def test_jobs_wait_completed(
    kelpie: Run, client: Client, container_group_id: str
) -> None:
    """wait returns 0 once all jobs completed."""
    [job_id] = submit(client, container_group_id)
    claimed = client.claim_work(machine_id="m", container_group_id=container_group_id)
    assert claimed is not None
    report = WorkerReport(
        machine_id="m", container_group_id=container_group_id, attempt=claimed.attempt
    )
    client.report_completed(job_id, report)
    assert 0 == kelpie("jobs", "wait", job_id, "--json")
    assert ["completed"] == [j["status"] for j in kelpie.json()]


def test_jobs_wait_unsuccessful(
    kelpie: Run,
    client: Client,
    container_group_id: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """wait exits 1 when a job ended canceled or failed, after printing the table."""
    [job_id] = submit(client, container_group_id)
    client.cancel(job_id)
    assert 1 == kelpie("jobs", "wait", job_id)
    assert "canceled" in kelpie.out
    assert f"did not complete: {job_id} (canceled)" in capsys.readouterr().err


def test_jobs_wait_timeout(
    kelpie: Run,
    client: Client,
    container_group_id: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A wait deadline gives exit 1 with a WaitTimeoutError message."""
    [job_id] = submit(client, container_group_id)
    assert 1 == kelpie("jobs", "wait", job_id, "--timeout", "0", "--json")
    assert "still unfinished" in capsys.readouterr().err
    assert "" == kelpie.out


def test_api_options_after_the_subcommand(api_server: Any, user_key: str) -> None:
    """--api-url/--api-key also work after the subcommand."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, color_system=None)
    argv = [
        "jobs",
        "list",
        "--json",
        "--api-url",
        api_server.url,
        "--api-key",
        user_key,
    ]
    assert 0 == main(argv, console=console)
    assert [] == json.loads(buffer.getvalue())


def test_environment_fallback(
    api_server: Any, user_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without options, KELPIE_API_URL and KELPIE_API_KEY are used."""
    monkeypatch.setenv("KELPIE_API_URL", api_server.url)
    monkeypatch.setenv("KELPIE_API_KEY", user_key)
    run = Run("", "")
    assert 0 == run("jobs", "list", "--json", auth=False)
    assert [] == run.json()


def test_no_credentials_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Without any key, exit 1 and the ConfigError message."""
    run = Run("", "")
    assert 1 == run("jobs", "list", auth=False)
    assert capsys.readouterr().err.startswith("Error: no API credentials")


def test_unreachable_server_is_one_line(
    closed_port_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Connection refused: exit 1 and one line that says what to check."""
    run = Run(closed_port_url, "k")
    assert 1 == run("jobs", "list")
    err = capsys.readouterr().err
    assert (
        f"Error: cannot reach {closed_port_url} (connection refused): is the server "
        "running? (`kelpie up` starts one)\n"
    ) == err


def test_wrong_base_url_is_one_line(
    api_server: Any, user_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A base URL with a path the server does not have: exit 1, a hint, one line."""
    run = Run(api_server.url + "/api", user_key)
    assert 1 == run("jobs", "list")
    err = capsys.readouterr().err
    # The server's request id ends the line.
    assert err.startswith(
        f"Error: 404 GET /jobs: {api_server.url}/api answered 404 for /jobs: is "
        "KELPIE_API_URL the server's base URL? (request_id="
    )
    assert err.endswith(")\n")
    assert 1 == err.count("\n")


def test_ctrl_c_exits_130(
    kelpie: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """KeyboardInterrupt during a command gives exit 130."""

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "list_jobs", interrupted)
    assert 130 == kelpie("jobs", "list")
    assert "Interrupted" in capsys.readouterr().err


def test_verbose_logs_requests(kelpie: Run, capsys: pytest.CaptureFixture[str]) -> None:
    """-vv logs requests to stderr with the key masked."""
    import logging

    logger = logging.getLogger("kelpie_sdk")
    handlers = list(logger.handlers)
    try:
        assert 0 == kelpie("-vv", "jobs", "list", "--json")
    finally:
        for handler in logger.handlers[len(handlers) :]:
            logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    err = capsys.readouterr().err
    assert "GET" in err
    assert kelpie.key not in err
    assert [] == kelpie.json()


@pytest.mark.parametrize(
    ("progress", "expected"),
    [
        (None, ""),
        ({}, ""),
        ({"step": 420, "total": 1000}, "42% step 420/1000"),
        ({"percent": 12.5}, "12%"),
        ({"fraction": 0.5, "message": "warming up"}, "50% warming up"),
        ({"step": 7}, "step 7"),
        ({"step": 1.5, "total_steps": 3}, "50% step 1.5/3"),
        ({"loss": 0.25, "epoch": 2}, "loss=0.25 epoch=2"),
        ({"percent": True}, "percent=True"),
    ],
)
def test_format_progress(progress: dict[str, Any] | None, expected: str) -> None:
    """Progress records are summarised in a few words."""
    assert expected == format_progress(progress)


def test_python_dash_m(tmp_path: Path) -> None:
    """`python -m kelpie_sdk --help` runs the CLI."""
    result = subprocess.run(
        [sys.executable, "-m", "kelpie_sdk", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=tmp_path,
    )
    assert 0 == result.returncode
    assert "submit" in result.stdout


def _running_job_with_progress(client: Client, group: str) -> str:
    """A running job with a long progress message, the widest kind of row."""
    [job_id] = submit(client, group)
    claimed = client.claim_work(machine_id="m", container_group_id=group)
    assert claimed is not None
    report = WorkerReport(
        machine_id="m",
        container_group_id=group,
        attempt=claimed.attempt,
        progress={"step": 420, "total": 1000, "message": "training epoch 3 of 10"},
    )
    client.heartbeat(job_id, report)
    return job_id


def _assert_rows_readable(out: str, job_ids: list[str], width: int) -> None:
    lines = out.splitlines()
    assert all(len(line) <= width for line in lines), out
    for job_id in job_ids:
        [row] = [line for line in lines if job_id in line]
        assert "running" in row or "pending" in row, out
    assert "Status" in out


@pytest.mark.parametrize("width", [80, 60])
def test_jobs_table_keeps_id_and_status_when_narrow(
    kelpie: Run, client: Client, container_group_id: str, width: int
) -> None:
    """At 80 columns (and narrower) every row shows the whole id and the status."""
    ids = [_running_job_with_progress(client, container_group_id)]
    ids += submit(client, container_group_id, 2)
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None)
    argv = ["--api-url", kelpie.url, "--api-key", kelpie.key, "jobs", "list"]
    assert 0 == main(argv, console=console)
    _assert_rows_readable(buffer.getvalue(), ids, width)


def test_jobs_table_wide_shows_every_column(
    kelpie: Run, client: Client, container_group_id: str
) -> None:
    """With room, the table has all its columns, progress included."""
    _running_job_with_progress(client, container_group_id)
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, color_system=None)
    argv = ["--api-url", kelpie.url, "--api-key", kelpie.key, "jobs", "list"]
    assert 0 == main(argv, console=console)
    out = buffer.getvalue()
    for text in ("Container group", "Created", "Failures", "Heartbeats", "Progress"):
        assert text in out
    assert container_group_id in out
    assert "42% step 420/1000 training epoch 3 of 10" in out


@pytest.mark.parametrize("columns", ["80", None])
def test_jobs_list_piped_is_readable(
    api_server: Any,
    user_key: str,
    client: Client,
    container_group_id: str,
    tmp_path: Path,
    columns: str | None,
) -> None:
    """Piped into a file (no terminal), rows keep the whole id and the status."""
    ids = [_running_job_with_progress(client, container_group_id)]
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    if columns is not None:
        env["COLUMNS"] = columns
    env.update(KELPIE_API_URL=api_server.url, KELPIE_API_KEY=user_key)
    with (tmp_path / "out.txt").open("w") as out:
        result = subprocess.run(
            [sys.executable, "-m", "kelpie_sdk", "jobs", "list"],
            stdout=out,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            check=False,
            timeout=60,
            env=env,
        )
    assert 0 == result.returncode, result.stderr
    _assert_rows_readable((tmp_path / "out.txt").read_text(), ids, 80)


def _ship(client: Client, job_id: str, attempt: int, *lines: tuple[str, str]) -> None:
    client.ship_logs(
        job_id,
        machine_id="m",
        attempt=attempt,
        offset=0,
        lines=[{"stream": s, "time": 1.7e9, "line": text} for s, text in lines],
    )


def test_jobs_logs_prints_each_stream_where_it_belongs(
    kelpie: Run,
    client: Client,
    container_group_id: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """stdout lines on stdout, stderr lines and attempt headers on stderr."""
    [job_id] = submit(client, container_group_id)
    claimed = client.claim_work(machine_id="m", container_group_id=container_group_id)
    assert claimed is not None
    _ship(client, job_id, 1, ("stdout", "out 1"), ("stderr", "err 1"))
    client.release(
        job_id, WorkerReport(machine_id="m", container_group_id=container_group_id)
    )
    client.claim_work(machine_id="m", container_group_id=container_group_id)
    _ship(client, job_id, 2, ("stdout", "out 2"))
    assert 0 == kelpie("jobs", "logs", job_id)
    assert "out 1\nout 2\n" == kelpie.out
    assert "--- attempt 1 ---\nerr 1\n--- attempt 2 ---\n" == capsys.readouterr().err
    assert 0 == kelpie("jobs", "logs", job_id, "--attempt", "2", "--timestamps")
    assert "2023-11-14 22:13:20 out 2\n" == kelpie.out
    assert 0 == kelpie("jobs", "logs", job_id[:8], "--attempt", "2")
    assert "out 2\n" == kelpie.out  # a unique id prefix, as the other job commands
    assert 0 == kelpie("jobs", "logs", job_id, "--json")
    assert [(1, "stdout", "out 1"), (1, "stderr", "err 1"), (2, "stdout", "out 2")] == [
        (x["attempt"], x["stream"], x["line"])
        for x in map(json.loads, kelpie.out.splitlines())
    ]


def test_jobs_logs_follow_ends_with_the_job(
    kelpie: Run, client: Client, container_group_id: str
) -> None:
    """-f returns once the job is final; an unknown job is an error."""
    [job_id] = submit(client, container_group_id)
    client.claim_work(machine_id="m", container_group_id=container_group_id)
    _ship(client, job_id, 1, ("stdout", "done soon"))
    client.report_completed(
        job_id,
        WorkerReport(machine_id="m", container_group_id=container_group_id, attempt=1),
    )
    assert 0 == kelpie("jobs", "logs", "-f", job_id)
    assert "done soon\n" == kelpie.out
    assert 0 != kelpie("jobs", "logs", str(uuid.uuid4()))


def test_jobs_logs_into_a_closed_pipe_ends_quietly(
    api_server: Any, user_key: str, client: Client, container_group_id: str
) -> None:
    """`kelpie jobs logs JOB | head -1` prints one line and no error."""
    [job_id] = submit(client, container_group_id)
    client.claim_work(machine_id="m", container_group_id=container_group_id)
    client.ship_logs(
        job_id,
        machine_id="m",
        attempt=1,
        offset=0,
        lines=[
            {"stream": "stdout", "time": 1.7e9, "line": f"line {i} " + "x" * 200}
            for i in range(4000)  # about 800 KiB: more than a pipe holds
        ],
    )
    proc = subprocess.run(
        [
            "bash",
            "-c",
            f"set -o pipefail; {sys.executable} -m kelpie_sdk jobs logs {job_id} "
            "| head -1",
        ],
        env=dict(
            os.environ,
            KELPIE_API_URL=api_server.url,
            KELPIE_API_KEY=user_key,
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (0, "line 0 " + "x" * 200 + "\n") == (proc.returncode, proc.stdout)
    assert "--- attempt 1 ---\n" == proc.stderr
