"""
examples/salad: the Dockerfile, the container group and the job submission.

The image is built only where a Docker daemon answers. Everything else is checked
without Docker: the files the Dockerfile copies exist, its command is one our CLI
accepts, the container group's variables make a complete worker configuration, and
a worker configured exactly that way runs the job of job.json against S3 (moto).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from kelpie_sdk import Client, JobStatus
from kelpie_sdk.cli import build_parser
from kelpie_sdk.errors import ConfigError
from kelpie_sdk.models import JobSubmission
from kelpie_sdk.testing import run_server
from kelpie_sdk.worker._config import WorkerConfig
from tests.examples.helpers import EXAMPLES, REPO, clean_env, load_example

SALAD = EXAMPLES / "salad"
#: What the worker needs that SaladCloud does not set itself.
REQUIRED = {
    "KELPIE_API_URL",
    "KELPIE_API_KEY",
    "KELPIE_STORAGE_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
}
#: What SaladCloud sets in every container.
FROM_SALAD = {"SALAD_CONTAINER_GROUP_ID", "SALAD_MACHINE_ID"}


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = (SALAD / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY."""
    copies = []
    for keyword, rest in _instructions():
        if keyword == "COPY":
            *sources, dest = shlex.split(rest)
            copies.append((sources, dest))
    return copies


def _cmd() -> list[str]:
    [cmd] = [rest for keyword, rest in _instructions() if keyword == "CMD"]
    argv = json.loads(cmd)  # the exec form: no shell in between
    assert isinstance(argv, list)
    return argv


def _substitute(text: str, values: dict[str, str]) -> str:
    """Replace ${NAME} placeholders as envsubst would; every one must be given."""

    def value(match: re.Match[str]) -> str:
        return values[match[1]]

    return re.sub(r"\$\{([A-Z_]+)\}", value, text)


def _container_group() -> dict[str, Any]:
    data = json.loads((SALAD / "container-group.json").read_text())
    assert isinstance(data, dict)
    return data


def test_dockerfile_copies_files_that_exist() -> None:
    """Every COPY source is in the repository and not excluded from the context."""
    ignore = (SALAD / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:] for line in ignore if line.startswith("!")]
    copies = _copies()
    assert copies
    for sources, _ in copies:
        for source in sources:
            assert (REPO / source).exists(), source
            assert any(
                source == path or source.startswith(path + "/") for path in allowed
            ), f"{source} is not let through Dockerfile.dockerignore"


def test_cmd_is_the_worker() -> None:
    """The image's command is `kelpie worker`, as our CLI parses it."""
    argv = _cmd()
    assert "kelpie" == argv[0]
    args = build_parser().parse_args(argv[1:])
    assert "worker" == args.command
    assert "_run" == args.handler.__name__
    assert "kelpie_sdk.cli._worker" == args.handler.__module__


def test_container_group_request() -> None:
    """The create request has the fields and value ranges SaladCloud's API takes."""
    group = _container_group()
    assert {"name", "container", "autostart_policy", "restart_policy", "replicas"} <= (
        group.keys()
    )
    assert re.fullmatch(r"[a-z][a-z0-9-]{0,61}[a-z0-9]", group["name"])
    assert 0 <= group["replicas"] <= 500
    assert group["restart_policy"] in {"always", "on_failure", "never"}
    assert isinstance(group["autostart_policy"], bool)
    container = group["container"]
    assert container["priority"] in {"high", "medium", "low", "batch"}
    assert isinstance(container["resources"]["cpu"], int)
    assert isinstance(container["resources"]["memory"], int)  # MB
    # No command: the image's CMD (`kelpie worker`) runs.
    assert "command" not in container


def test_container_group_configures_the_worker() -> None:
    """Its variables and SaladCloud's make a complete worker configuration."""
    env = _container_group()["container"]["environment_variables"]
    assert all(isinstance(v, str) for v in env.values())
    assert REQUIRED <= env.keys()
    # SaladCloud sets these per container; one value for all would make every
    # replica the same machine (a ban on one would ban all).
    assert not FROM_SALAD & env.keys()
    placeholders = set(re.findall(r"\$\{([A-Z_]+)\}", json.dumps(env)))
    filled = json.loads(
        _substitute(json.dumps(env), {name: f"<{name}>" for name in placeholders})
    )
    salad = {"SALAD_CONTAINER_GROUP_ID": str(uuid.uuid4()), "SALAD_MACHINE_ID": "m-1"}
    config = WorkerConfig.from_env({**filled, **salad})
    assert "<KELPIE_API_URL>" == config.api_url
    assert "<KELPIE_API_KEY>" == config.api_key
    assert "s3://" == config.storage_url
    assert salad["SALAD_CONTAINER_GROUP_ID"] == config.container_group_id
    with pytest.raises(ConfigError):
        WorkerConfig.from_env(filled)  # without SaladCloud's variables


def test_job_runs_the_program_in_the_image() -> None:
    """job.json is a valid submission whose program is the one the image copies."""
    text = _substitute(
        (SALAD / "job.json").read_text(),
        {"CONTAINER_GROUP_ID": str(uuid.uuid4()), "BUCKET": "b"},
    )
    job = JobSubmission.from_json(json.loads(text))
    destinations = {dest for _, dest in _copies()}
    assert job.arguments[0] in destinations
    assert job.sync is not None
    [after] = job.sync.after
    output = job.arguments[job.arguments.index("--output") + 1]
    assert after.local_path == output


@pytest.mark.s3
@pytest.mark.slow
def test_worker_configured_like_salad_runs_the_job(
    s3_bucket: str, moto_endpoint: str, tmp_path: Path
) -> None:
    """A worker with the container group's settings runs job.json on S3 to the end."""
    import boto3

    mc = load_example("monte_carlo/monte_carlo.py")
    app = tmp_path / "app"  # stands in for the image's /app
    app.mkdir()
    group_id = str(uuid.uuid4())
    with run_server() as server, Client(server.url, server.admin_key) as client:
        values = {
            "KELPIE_API_URL": server.url,
            "KELPIE_API_KEY": server.admin_key,
            "AWS_ENDPOINT_URL": moto_endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "IMAGE": "unused",
        }
        group = json.loads(
            _substitute((SALAD / "container-group.json").read_text(), values)
        )
        env = clean_env(
            **group["container"]["environment_variables"],
            SALAD_CONTAINER_GROUP_ID=group_id,
            SALAD_MACHINE_ID="salad-node-1",
            # Outside a container: the legacy directories under tmp_path.
            INPUT_DIR=str(tmp_path / "input"),
            OUTPUT_DIR=str(tmp_path / "output"),
            CHECKPOINT_DIR=str(tmp_path / "checkpoint"),
        )
        argv = _cmd()
        assert ["kelpie", "worker"] == argv
        text = _substitute(
            (SALAD / "job.json").read_text(),
            {"CONTAINER_GROUP_ID": group_id, "BUCKET": s3_bucket},
        )
        text = text.replace("/app/monte_carlo.py", str(mc.__file__))
        text = text.replace('"/app/', f'"{app}/')
        submission = json.loads(text)
        submission["command"] = sys.executable
        submission["arguments"][2] = "10"  # --batches: a short run
        submission["heartbeat_interval"] = 2
        job = client.submit_job(**submission)
        with (tmp_path / "worker.log").open("wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "kelpie_sdk", *argv[1:]],
                env=env,
                cwd=app,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 60
            while not (done := client.get_job(job.id)).finished:
                assert time.monotonic() < deadline, (
                    tmp_path / "worker.log"
                ).read_text()
                time.sleep(0.2)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)
    log_text = (tmp_path / "worker.log").read_text()
    assert JobStatus.COMPLETED == done.status, log_text
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    body = s3.get_object(Bucket=s3_bucket, Key="monte-carlo/run-1/out/result.json")
    expected = mc.dumps(mc.expected_result(mc.Params(batches=10)))
    assert expected == body["Body"].read().decode()
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="monte-carlo/run-1/ckpt/")
    assert any("/steps/" in obj["Key"] for obj in listed.get("Contents", []))


def _docker_daemon() -> str | None:
    """Why the image cannot be built here, or None when Docker answers."""
    if shutil.which("docker") is None:
        return "no docker command"
    info = subprocess.run(
        ["docker", "info"], capture_output=True, text=True, timeout=60, check=False
    )
    if info.returncode != 0:
        return f"no Docker daemon (`docker info` exited {info.returncode})"
    return None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_image_builds_and_runs() -> None:
    """The image builds; its command is the worker; the job runs inside it."""
    reason = _docker_daemon()
    if reason is not None:
        pytest.skip(f"the image build needs Docker: {reason}")
    tag = f"kelpie-sdk-salad-example-test:{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["docker", "build", "-f", str(SALAD / "Dockerfile"), "-t", tag, str(REPO)],
        check=True,
        timeout=800,
    )
    try:
        help_run = subprocess.run(
            ["docker", "run", "--rm", tag, *_cmd(), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert "--container-group-id" in help_run.stdout
        small = ["--batches=3", "--paths=1000", "--checkpoint-url=memory://ckpt"]
        job = subprocess.run(
            ["docker", "run", "--rm", tag, "python", "/app/monte_carlo.py", *small],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        mc = load_example("monte_carlo/monte_carlo.py")
        params = mc.Params(batches=3, paths_per_batch=1000)
        assert mc.dumps(mc.expected_result(params)) == job.stdout.splitlines(True)[-1]
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, check=False)
