"""
The worker's settings: environment variables (the original worker's names and
defaults, see docs/worker.md) and command-line flags, flags winning.

=============================  ===============================  ==================
Setting                        Environment variable             Default
=============================  ===============================  ==================
``api_url``                    ``KELPIE_API_URL``               the client's default
``api_key``                    ``KELPIE_API_KEY``               none
``salad_api_key``              ``SALAD_API_KEY``                none
``salad_organization``         ``SALAD_ORGANIZATION``,          none
                               else ``SALAD_ORGANIZATION_NAME``
``salad_project``              ``SALAD_PROJECT``,               none
                               else ``SALAD_PROJECT_NAME``
``machine_id``                 ``SALAD_MACHINE_ID``             generated from the host
``container_group_id``         ``SALAD_CONTAINER_GROUP_ID``     required
``max_retries``                ``MAX_RETRIES``                  3
``max_job_failures``           ``MAX_JOB_FAILURES``             5
``max_time_with_no_work_s``    ``MAX_TIME_WITH_NO_WORK_S``      0 (never)
``poll_interval_s``            ``HEARTBEAT_INTERVAL_S``         10
``state_file``                 ``KELPIE_STATE_FILE``            ``./kelpie-state.json``
``input_dir``                  ``INPUT_DIR``                    ``/input``
``output_dir``                 ``OUTPUT_DIR``                   ``/output``
``checkpoint_dir``             ``CHECKPOINT_DIR``               ``/checkpoint``
``storage_url``                ``KELPIE_STORAGE_URL``           ``s3://``
``kill_grace_s``               ``KELPIE_KILL_GRACE_S``          10
``long_poll_s``                ``KELPIE_LONG_POLL_S``           20
``slots``                      ``KELPIE_SLOTS``                 1
``slot_gpus``                  ``KELPIE_SLOT_GPUS``             none
``log_level``                  ``KELPIE_LOG_LEVEL``             ``info``
``imds_mode``                  ``KELPIE_IMDS``                  ``auto``
``imds_url``                   ``KELPIE_IMDS_URL``              ``http://169.254.169.254``
``reallocate_wait_s``          ``KELPIE_REALLOCATE_WAIT_S``     60
``metrics_port``               ``KELPIE_METRICS_PORT``          none (off)
``metrics_host``               ``KELPIE_METRICS_HOST``          ``127.0.0.1``
``ship_logs``                  ``KELPIE_SHIP_LOGS``             true
=============================  ===============================  ==================

``imds_enabled`` is derived: ``on`` and ``off`` say it; ``auto`` is on only where
SaladCloud's own variables are all set (see ``kelpie_sdk.worker._imds``).
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from kelpie_sdk.config import Settings
from kelpie_sdk.errors import ConfigError
from kelpie_sdk.models import MAX_LONG_POLL
from kelpie_sdk.storage import check_storage_url
from kelpie_sdk.worker._imds import (
    DEFAULT_IMDS_URL,
    check_imds_mode,
    check_imds_url,
    imds_enabled,
)

__all__ = [
    "DEFAULT_STATE_FILE",
    "MAX_LONG_POLL_S",
    "SlotConfig",
    "WorkerConfig",
    "default_machine_id",
    "parse_slot_gpus",
]

DEFAULT_STATE_FILE = "./kelpie-state.json"
#: The longest long-poll the server accepts (``GET /work?wait=``).
MAX_LONG_POLL_S = MAX_LONG_POLL


def default_machine_id(hostname: str | None = None) -> str:
    """
    A machine id that stays the same across restarts on the same host.

    SaladCloud sets ``SALAD_MACHINE_ID``; elsewhere the worker derives one from
    the host name, so that a restarted worker can still release the job its
    state file names (the server checks the holder).

    Args:
        hostname: The host name; ``socket.gethostname()`` when ``None``.

    Returns:
        ``<hostname>-<8 hex digits>``.
    """
    host = hostname if hostname is not None else socket.gethostname()
    digest = hashlib.sha256(host.encode()).hexdigest()[:8]
    return f"{host or 'host'}-{digest}"


def parse_slot_gpus(text: str | None) -> tuple[str, ...] | None:
    """
    Parse the per-slot GPU list.

    ``"0,1,2,3"`` gives slot 0 GPU 0, slot 1 GPU 1, and so on; ``"0+1,2+3"``
    gives slot 0 GPUs 0 and 1 (``CUDA_VISIBLE_DEVICES=0,1``).

    Args:
        text: The flag or environment value; empty or ``None`` for no pinning.

    Returns:
        One ``CUDA_VISIBLE_DEVICES`` value per slot, or ``None``.

    Raises:
        ConfigError: An entry is empty.
    """
    if not text or not text.strip():
        return None
    entries = [part.strip() for part in text.split(",")]
    if any(not entry for entry in entries):
        raise ConfigError(
            f"--slot-gpus / KELPIE_SLOT_GPUS: empty entry in {text!r} "
            "(expected e.g. '0,1' or '0+1,2+3')"
        )
    return tuple(",".join(p.strip() for p in entry.split("+")) for entry in entries)


def _int_env(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float_env(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {value}")
    return value


def _bool_env(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


@attrs.frozen(kw_only=True)
class SlotConfig:
    """
    What one slot of the worker owns: its directories, state file and GPUs.

    Attributes:
        index: The slot number, from 0.
        input_dir: Where legacy inputs are downloaded.
        output_dir: What legacy outputs are uploaded from.
        checkpoint_dir: Where legacy checkpoints live (snapshotted to storage).
        state_file: This slot's state file.
        progress_file: Where the job writes its progress record.
        cuda_visible_devices: The GPUs pinned to this slot, if any.
    """

    index: int
    input_dir: Path
    output_dir: Path
    checkpoint_dir: Path
    state_file: Path
    progress_file: Path
    cuda_visible_devices: str | None = None


@attrs.frozen(kw_only=True)
class WorkerConfig:
    """
    Everything the worker needs to know; see the module docstring for sources.
    """

    api_url: str | None = None
    api_key: str | None = attrs.field(default=None, repr=False)
    salad_api_key: str | None = attrs.field(default=None, repr=False)
    salad_organization: str | None = None
    salad_project: str | None = None
    machine_id: str
    machine_id_generated: bool = False
    container_group_id: str
    max_retries: int = 3
    max_job_failures: int = 5
    max_time_with_no_work_s: float = 0.0
    poll_interval_s: float = 10.0
    state_file: Path = Path(DEFAULT_STATE_FILE)
    input_dir: Path = Path("/input")
    output_dir: Path = Path("/output")
    checkpoint_dir: Path = Path("/checkpoint")
    storage_url: str = "s3://"
    kill_grace_s: float = 10.0
    long_poll_s: float = 20.0
    slots: int = 1
    slot_gpus: tuple[str, ...] | None = None
    log_level: str = "info"
    work_root: Path | None = None
    imds_mode: str = "auto"
    imds_enabled: bool = False
    imds_url: str = DEFAULT_IMDS_URL
    reallocate_wait_s: float = 60.0
    #: Serve Prometheus metrics on this port (0: any free port); None: off.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    #: Send each job's output to the server (``GET /jobs/{id}/logs``).
    ship_logs: bool = True

    def __attrs_post_init__(self) -> None:
        if not self.container_group_id:
            raise ConfigError(
                "no queue: pass --container-group-id (or set SALAD_CONTAINER_GROUP_ID)"
            )
        if not self.machine_id:
            raise ConfigError("--machine-id (SALAD_MACHINE_ID) must not be empty")
        if self.long_poll_s > MAX_LONG_POLL_S:
            raise ConfigError(
                f"--long-poll / KELPIE_LONG_POLL_S must be at most "
                f"{MAX_LONG_POLL_S:g} s, got {self.long_poll_s:g}"
            )
        check_imds_mode(self.imds_mode)
        check_imds_url(self.imds_url)
        if self.slots < 1:
            raise ConfigError(f"--slots must be at least 1, got {self.slots}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(
                "--metrics-port (KELPIE_METRICS_PORT) must be between 0 and 65535, "
                f"got {self.metrics_port}"
            )
        try:
            check_storage_url(self.storage_url)
        except ConfigError as exc:
            raise ConfigError(f"--storage-url / KELPIE_STORAGE_URL: {exc}") from None
        if self.slot_gpus is not None and len(self.slot_gpus) < self.slots:
            raise ConfigError(
                f"--slot-gpus names {len(self.slot_gpus)} GPU set(s) for "
                f"{self.slots} slot(s); give one per slot"
            )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> WorkerConfig:
        """
        Read the settings from the environment, then apply ``overrides``.

        Args:
            environ: The environment; ``os.environ`` when ``None``.
            **overrides: Field values from flags; ``None`` values are ignored.

        Returns:
            The validated configuration.

        Raises:
            ConfigError: A value is missing or invalid.
        """
        env = os.environ if environ is None else environ
        # The API's own variables and their precedence live in one place.
        api = Settings.from_env(env)
        values: dict[str, Any] = {
            "api_url": api.api_url,
            "api_key": api.api_key,
            "salad_api_key": api.salad_api_key,
            "salad_organization": api.salad_organization,
            "salad_project": api.salad_project,
            "machine_id": env.get("SALAD_MACHINE_ID", "").strip(),
            "container_group_id": env.get("SALAD_CONTAINER_GROUP_ID", "").strip(),
            "max_retries": _int_env(env, "MAX_RETRIES", 3, 1),
            "max_job_failures": _int_env(env, "MAX_JOB_FAILURES", 5, 1),
            "max_time_with_no_work_s": _float_env(env, "MAX_TIME_WITH_NO_WORK_S", 0.0),
            "poll_interval_s": _float_env(env, "HEARTBEAT_INTERVAL_S", 10.0),
            "state_file": env.get("KELPIE_STATE_FILE") or DEFAULT_STATE_FILE,
            "input_dir": env.get("INPUT_DIR") or "/input",
            "output_dir": env.get("OUTPUT_DIR") or "/output",
            "checkpoint_dir": env.get("CHECKPOINT_DIR") or "/checkpoint",
            "storage_url": env.get("KELPIE_STORAGE_URL") or "s3://",
            "kill_grace_s": _float_env(env, "KELPIE_KILL_GRACE_S", 10.0),
            "long_poll_s": _float_env(env, "KELPIE_LONG_POLL_S", 20.0),
            "slots": _int_env(env, "KELPIE_SLOTS", 1, 1),
            "slot_gpus": parse_slot_gpus(env.get("KELPIE_SLOT_GPUS")),
            "log_level": env.get("KELPIE_LOG_LEVEL") or "info",
            "imds_mode": env.get("KELPIE_IMDS") or "auto",  # normalized below
            "imds_url": (env.get("KELPIE_IMDS_URL") or DEFAULT_IMDS_URL).rstrip("/"),
            "reallocate_wait_s": _float_env(env, "KELPIE_REALLOCATE_WAIT_S", 60.0),
            "metrics_port": (
                _int_env(env, "KELPIE_METRICS_PORT", 0, 0)
                if env.get("KELPIE_METRICS_PORT", "").strip()
                else None
            ),
            "metrics_host": env.get("KELPIE_METRICS_HOST") or "127.0.0.1",
            "ship_logs": _bool_env(env, "KELPIE_SHIP_LOGS", default=True),
        }
        for key, value in overrides.items():
            if key not in attrs.fields_dict(cls):
                raise TypeError(f"unknown worker setting {key!r}")
            if value is not None:
                values[key] = value
        values["imds_mode"] = str(values["imds_mode"]).strip().lower()
        if "imds_enabled" not in overrides or overrides["imds_enabled"] is None:
            values["imds_enabled"] = imds_enabled(values["imds_mode"], env)
        if not values["machine_id"]:
            values["machine_id"] = default_machine_id()
            values["machine_id_generated"] = True
        for key in ("state_file", "input_dir", "output_dir", "checkpoint_dir"):
            values[key] = Path(values[key]).expanduser().absolute()
        if values.get("slot_gpus") is not None and isinstance(values["slot_gpus"], str):
            values["slot_gpus"] = parse_slot_gpus(values["slot_gpus"])
        return cls(**values)

    def slot(self, index: int) -> SlotConfig:
        """
        The directories, state file and GPUs of one slot.

        With one slot these are the configured paths. With several, slot ``i``
        uses ``<dir>/slot-<i>`` for each directory and
        ``<state stem>.slot-<i><suffix>`` for its state file.
        """
        state = self.state_file
        if self.slots == 1:
            dirs = (self.input_dir, self.output_dir, self.checkpoint_dir)
        else:
            name = f"slot-{index}"
            dirs = (
                self.input_dir / name,
                self.output_dir / name,
                self.checkpoint_dir / name,
            )
            state = state.with_name(f"{state.stem}.slot-{index}{state.suffix}")
        progress = state.with_name(f"{state.stem}.progress.json")
        return SlotConfig(
            index=index,
            input_dir=dirs[0],
            output_dir=dirs[1],
            checkpoint_dir=dirs[2],
            state_file=state,
            progress_file=progress,
            cuda_visible_devices=(
                None if self.slot_gpus is None else self.slot_gpus[index]
            ),
        )
