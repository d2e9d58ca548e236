"""
Hypothesis strategies for the wire models.
"""

from __future__ import annotations

import datetime as dt

from hypothesis import strategies as st

from kelpie_sdk.models import (
    LEGACY_STORAGE_FIELDS,
    Job,
    JobStatus,
    JobSubmission,
    SyncConfig,
    SyncDirection,
    SyncSpec,
    WorkerReport,
)

text = st.text(max_size=12)
ids = st.uuids().map(str)
# The wire carries milliseconds, so generated timestamps do too.
# Naive bounds are what hypothesis wants; the timezone comes from `timezones`.
timestamps = st.datetimes(
    min_value=dt.datetime(2000, 1, 1),  # noqa: DTZ001
    max_value=dt.datetime(2100, 1, 1),  # noqa: DTZ001
    timezones=st.just(dt.UTC),
).map(lambda t: t.replace(microsecond=t.microsecond // 1000 * 1000))
json_scalars = st.none() | st.booleans() | st.integers() | text
progress = st.dictionaries(text, json_scalars, max_size=4)
names = st.text(min_size=1, max_size=20).filter(
    lambda n: n.strip() != "" and not any(ord(c) < 32 or ord(c) == 127 for c in n)
)
tags = st.lists(
    st.from_regex(r"[a-z0-9][a-z0-9_.:/=+@-]{0,10}", fullmatch=True), max_size=4
)

sync_configs = st.builds(
    SyncConfig,
    bucket=text,
    prefix=text,
    local_path=text,
    direction=st.sampled_from(SyncDirection),
    pattern=st.none() | text,
)
phase = st.none() | st.lists(sync_configs, max_size=3).map(tuple)
sync_specs = st.builds(SyncSpec, before=phase, during=phase, after=phase)


@st.composite
def jobs(draw: st.DrawFn) -> Job:
    sync = draw(st.none() | sync_specs)
    legacy = (
        {k: draw(st.none() | text) for k in LEGACY_STORAGE_FIELDS}
        if sync is None
        else {}
    )
    opt_time = st.none() | timestamps
    return Job(
        id=draw(ids),
        user_id=draw(ids),
        status=draw(st.sampled_from(JobStatus)),
        created=draw(timestamps),
        started=draw(opt_time),
        completed=draw(opt_time),
        canceled=draw(opt_time),
        failed=draw(opt_time),
        heartbeat=draw(opt_time),
        num_failures=draw(st.integers(0, 10)),
        machine_id=draw(st.none() | text),
        command=draw(text),
        arguments=draw(st.lists(text, max_size=3)),
        environment=draw(st.dictionaries(text, text, max_size=3)),
        **legacy,
        max_failures=draw(st.integers(1, 10)),
        heartbeat_interval=draw(st.integers(1, 600)),
        container_group_id=draw(ids),
        webhook=draw(st.none() | text),
        compression=draw(st.booleans()),
        num_heartbeats=draw(st.integers(0, 10**6)),
        sync=sync,
        attempt=draw(st.none() | st.integers(0, 100)),
        num_interruptions=draw(st.none() | st.integers(0, 100)),
        lease_expires=draw(opt_time),
        progress=draw(st.none() | progress),
        last_error=draw(st.none() | text),
        name=draw(st.none() | names),
        tags=draw(st.none() | tags),
        goodput=draw(st.none() | st.floats(0, 1)),
    )


submissions = st.builds(
    JobSubmission,
    command=text,
    container_group_id=ids,
    arguments=st.lists(text, max_size=3),
    environment=st.dictionaries(text, text, max_size=3),
    input_bucket=st.none() | text,
    max_failures=st.integers(1, 10),
    heartbeat_interval=st.integers(1, 600),
    webhook=st.none() | text,
    compression=st.booleans(),
    sync=st.none() | sync_specs,
    name=st.none() | names,
    tags=tags,
)

reports = st.builds(
    WorkerReport,
    machine_id=text,
    container_group_id=text,
    attempt=st.none() | st.integers(0, 100),
    progress=st.none() | progress,
    exit_code=st.none() | st.integers(-255, 255),
    error=st.none() | text,
    reason=st.none() | text,
)
