"""
Worker settings: environment names and defaults of the original, flags on top.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kelpie_sdk.errors import ConfigError
from kelpie_sdk.worker import WorkerConfig, build_parser, config_from_args
from kelpie_sdk.worker._config import default_machine_id, parse_slot_gpus

BASE = {"SALAD_CONTAINER_GROUP_ID": "cg", "SALAD_MACHINE_ID": "m1"}


def test_defaults_match_the_original() -> None:
    """Without variables the original worker's defaults apply."""
    config = WorkerConfig.from_env(BASE)
    assert (3, 5, 0.0, 10.0) == (
        config.max_retries,
        config.max_job_failures,
        config.max_time_with_no_work_s,
        config.poll_interval_s,
    )
    assert Path("/input") == config.input_dir
    assert Path("/output") == config.output_dir
    assert Path("/checkpoint") == config.checkpoint_dir
    assert Path("kelpie-state.json").absolute() == config.state_file
    assert ("s3://", 10.0, 20.0, 1) == (
        config.storage_url,
        config.kill_grace_s,
        config.long_poll_s,
        config.slots,
    )


def test_environment_is_read() -> None:
    """Every documented variable reaches its setting."""
    env = {
        **BASE,
        "KELPIE_API_URL": "http://x:1",
        "KELPIE_API_KEY": "k",
        "SALAD_ORGANIZATION_NAME": "org",
        "SALAD_PROJECT_NAME": "proj",
        "MAX_RETRIES": "7",
        "MAX_JOB_FAILURES": "2",
        "MAX_TIME_WITH_NO_WORK_S": "30",
        "KELPIE_STATE_FILE": "/tmp/s.json",
        "INPUT_DIR": "/a",
        "OUTPUT_DIR": "/b",
        "CHECKPOINT_DIR": "/c",
        "KELPIE_STORAGE_URL": "file:///data",
        "KELPIE_KILL_GRACE_S": "2.5",
        "KELPIE_LONG_POLL_S": "0",
        "KELPIE_SLOTS": "2",
        "KELPIE_SLOT_GPUS": "0,1",
    }
    c = WorkerConfig.from_env(env)
    assert ("http://x:1", "k", "org", "proj") == (
        c.api_url,
        c.api_key,
        c.salad_organization,
        c.salad_project,
    )
    assert (7, 2, 30.0) == (
        c.max_retries,
        c.max_job_failures,
        c.max_time_with_no_work_s,
    )
    assert (Path("/tmp/s.json"), Path("/a"), Path("/b"), Path("/c")) == (
        c.state_file,
        c.input_dir,
        c.output_dir,
        c.checkpoint_dir,
    )
    assert ("file:///data", 2.5, 0.0, 2, ("0", "1")) == (
        c.storage_url,
        c.kill_grace_s,
        c.long_poll_s,
        c.slots,
        c.slot_gpus,
    )


def test_salad_names_take_precedence_in_order() -> None:
    """SALAD_ORGANIZATION wins over SALAD_ORGANIZATION_NAME, as with `??`."""
    env = {
        **BASE,
        "SALAD_ORGANIZATION": "a",
        "SALAD_ORGANIZATION_NAME": "b",
        "SALAD_PROJECT": "p",
        "SALAD_PROJECT_NAME": "q",
    }
    c = WorkerConfig.from_env(env)
    assert ("a", "p") == (c.salad_organization, c.salad_project)


def test_flags_override_environment() -> None:
    """A flag beats its variable."""
    args = build_parser().parse_args(
        [
            "--machine-id",
            "flag-m",
            "--slots",
            "3",
            "--long-poll",
            "5",
            "--input-dir",
            "/x",
        ]
    )
    c = config_from_args(args, {**BASE, "KELPIE_SLOTS": "1", "INPUT_DIR": "/y"})
    assert ("flag-m", 3, 5.0, Path("/x")) == (
        c.machine_id,
        c.slots,
        c.long_poll_s,
        c.input_dir,
    )


def test_container_group_is_required() -> None:
    """Without a queue the worker refuses to start, naming the variable."""
    with pytest.raises(ConfigError, match="SALAD_CONTAINER_GROUP_ID"):
        WorkerConfig.from_env({"SALAD_MACHINE_ID": "m"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_RETRIES", "x"),
        ("MAX_RETRIES", "0"),
        ("KELPIE_KILL_GRACE_S", "-1"),
        ("KELPIE_LONG_POLL_S", "61"),
    ],
    ids=["not-int", "too-small", "negative", "long-poll-too-long"],
)
def test_bad_numbers_are_rejected(name: str, value: str) -> None:
    """A malformed number is a ConfigError naming the variable."""
    with pytest.raises(ConfigError, match=name):
        WorkerConfig.from_env({**BASE, name: value})


@pytest.mark.parametrize("url", ["fiel:///tmp/x", "s4://bucket", "tmp/relative"])
def test_misspelled_storage_urls_are_rejected(url: str) -> None:
    """A storage URL whose protocol fsspec does not know stops the worker at start."""
    with pytest.raises(ConfigError, match="KELPIE_STORAGE_URL") as info:
        WorkerConfig.from_env({**BASE, "KELPIE_STORAGE_URL": url})
    assert url in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "url", ["s3://", "file:///srv/k", "/srv/k", "memory://r", "gs://b"]
)
def test_known_storage_protocols_are_accepted(url: str) -> None:
    """Every protocol that fsspec knows passes, whether or not it is installed."""
    assert url == WorkerConfig.from_env({**BASE, "KELPIE_STORAGE_URL": url}).storage_url


def test_machine_id_is_generated_and_stable() -> None:
    """An empty SALAD_MACHINE_ID gives a host-derived id that does not change."""
    c1 = WorkerConfig.from_env({"SALAD_CONTAINER_GROUP_ID": "cg"})
    c2 = WorkerConfig.from_env(
        {"SALAD_CONTAINER_GROUP_ID": "cg", "SALAD_MACHINE_ID": ""}
    )
    assert c1.machine_id == c2.machine_id
    assert c1.machine_id_generated
    assert default_machine_id("h") == default_machine_id("h")
    assert default_machine_id("h") != default_machine_id("g")


def test_slots_get_their_own_directories_and_state() -> None:
    """With several slots each gets sub-directories, a state file and its GPUs."""
    c = WorkerConfig.from_env(
        {**BASE, "INPUT_DIR": "/in", "KELPIE_STATE_FILE": "/s/st.json"},
        slots=2,
        slot_gpus="0+1,2+3",
    )
    s1 = c.slot(1)
    assert Path("/in/slot-1") == s1.input_dir
    assert Path("/s/st.slot-1.json") == s1.state_file
    assert "2,3" == s1.cuda_visible_devices
    assert c.slot(0).state_file != s1.state_file
    assert c.slot(0).progress_file != s1.progress_file


def test_one_slot_uses_the_configured_paths() -> None:
    """A single slot uses INPUT_DIR and KELPIE_STATE_FILE as they are."""
    c = WorkerConfig.from_env(
        {**BASE, "INPUT_DIR": "/in", "KELPIE_STATE_FILE": "/s.json"}
    )
    assert (Path("/in"), Path("/s.json"), None) == (
        c.slot(0).input_dir,
        c.slot(0).state_file,
        c.slot(0).cuda_visible_devices,
    )


def test_slot_gpus_must_cover_every_slot() -> None:
    """Fewer GPU sets than slots is an error."""
    with pytest.raises(ConfigError, match="one per slot"):
        WorkerConfig.from_env(BASE, slots=3, slot_gpus="0,1")


@pytest.mark.parametrize(
    ("text", "expected"),
    [(None, None), ("", None), ("0", ("0",)), ("0+1, 2", ("0,1", "2"))],
)
def test_parse_slot_gpus(text: str | None, expected: tuple[str, ...] | None) -> None:
    """GPU lists parse into one CUDA_VISIBLE_DEVICES value per slot."""
    assert expected == parse_slot_gpus(text)


def test_parse_slot_gpus_rejects_empty_entries() -> None:
    """'0,,1' is a mistake, not an unpinned slot."""
    with pytest.raises(ConfigError):
        parse_slot_gpus("0,,1")


@pytest.mark.parametrize(
    ("env", "argv", "expected"),
    [
        ({}, [], True),
        ({"KELPIE_SHIP_LOGS": "false"}, [], False),
        ({"KELPIE_SHIP_LOGS": "0"}, ["--ship-logs"], True),
        ({"KELPIE_SHIP_LOGS": "yes"}, ["--no-ship-logs"], False),
    ],
)
def test_log_shipping_is_on_unless_turned_off(
    env: dict[str, str], argv: list[str], expected: bool
) -> None:
    """KELPIE_SHIP_LOGS and --ship-logs/--no-ship-logs, the flag winning."""
    args = build_parser().parse_args(["--container-group-id", "g", *argv])
    assert expected is config_from_args(args, environ=env).ship_logs


def test_a_bad_ship_logs_value_is_rejected() -> None:
    """KELPIE_SHIP_LOGS=maybe names the variable and the values it takes."""
    with pytest.raises(ConfigError, match="KELPIE_SHIP_LOGS must be true or false"):
        WorkerConfig.from_env(
            {"SALAD_CONTAINER_GROUP_ID": "g", "KELPIE_SHIP_LOGS": "maybe"}
        )
