"""
``kelpie submit`` and ``kelpie jobs list|get|events|cancel|wait|purge|logs``.

Job ids may be given by any unique prefix (``kelpie jobs get 3f2a``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import attrs
from rich.table import Table
from rich.text import Text

from kelpie_sdk.cli._common import (
    EXIT_ERROR,
    EXIT_OK,
    Context,
    UsageError,
    add_api_options,
    format_progress,
    format_time,
    jobs_table,
    leaf_parser,
    non_negative_int,
    print_json,
    resolve_job_id,
)
from kelpie_sdk.cli._live import JobsView
from kelpie_sdk.cli._machines import print_unserved
from kelpie_sdk.models import (
    LEGACY_STORAGE_FIELDS,
    Job,
    JobEvent,
    JobStatus,
    JobSubmission,
)

__all__ = ["register"]

#: Waits between polls of ``list --watch`` (tests replace it).
_sleep = time.sleep


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """
    Add ``submit`` and the ``jobs`` group.
    """
    _register_submit(subparsers)
    jobs = subparsers.add_parser(
        "jobs", help="list, inspect, cancel and wait for jobs", description="Jobs."
    )
    actions = jobs.add_subparsers(dest="jobs_command", metavar="ACTION")
    actions.required = True

    listing = leaf_parser(actions, "list", "list jobs, newest first")
    listing.add_argument(
        "--status", choices=[s.value for s in JobStatus], help="only this status"
    )
    listing.add_argument("--container-group-id", metavar="ID", help="only this group")
    listing.add_argument("--name", help="only jobs with exactly this name")
    listing.add_argument(
        "--tag",
        dest="tags",
        action="append",
        default=[],
        metavar="TAG",
        help="only jobs carrying this tag (repeat: jobs carrying all of them)",
    )
    listing.add_argument(
        "--limit",
        type=non_negative_int,
        default=50,
        help="show at most this many jobs; 0 for all (default: 50)",
    )
    listing.add_argument(
        "--page-size",
        type=_positive_int,
        default=100,
        help="jobs per request (default: 100)",
    )
    listing.add_argument("--asc", action="store_true", help="oldest first")
    listing.add_argument(
        "--watch",
        action="store_true",
        help="redraw a live table until Ctrl-C (plain lines on change when "
        "not a terminal)",
    )
    listing.add_argument(
        "--interval",
        type=_positive_float,
        default=2.0,
        metavar="SECONDS",
        help="with --watch: seconds between polls (default: 2)",
    )
    listing.set_defaults(handler=_list)

    get = leaf_parser(actions, "get", "show one job")
    get.add_argument("job_id", metavar="JOB_ID", help="a job id or a unique prefix")
    get.set_defaults(handler=_get)

    history = leaf_parser(
        actions,
        "events",
        "show a job's history: every transition with its cause, and the "
        "compute of each attempt",
    )
    history.add_argument("job_id", metavar="JOB_ID", help="a job id or a unique prefix")
    history.set_defaults(handler=_events)

    cancel = leaf_parser(actions, "cancel", "cancel jobs")
    cancel.add_argument(
        "job_ids", metavar="JOB_ID", nargs="+", help="job ids or unique prefixes"
    )
    cancel.set_defaults(handler=_cancel)

    purge = leaf_parser(
        actions,
        "purge",
        "delete the pending jobs of a container group and cancel its running ones",
    )
    purge.add_argument(
        "--container-group-id", metavar="ID", required=True, help="the group"
    )
    purge.add_argument(
        "--yes", action="store_true", help="do it (without it, nothing is purged)"
    )
    purge.set_defaults(handler=_purge)

    wait = leaf_parser(
        actions,
        "wait",
        "wait until jobs finish; exit 1 if any did not complete",
    )
    wait.add_argument(
        "job_ids", metavar="JOB_ID", nargs="+", help="job ids or unique prefixes"
    )
    wait.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up after this long (default: wait as long as it takes)",
    )
    wait.add_argument(
        "--poll-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between polls (default: 2)",
    )
    wait.set_defaults(handler=_wait)

    logs = leaf_parser(
        actions,
        "logs",
        "print a job's output: stdout lines on stdout, stderr lines on stderr",
    )
    logs.add_argument("job_id", metavar="JOB_ID")
    logs.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing new lines until the job reaches a final state",
    )
    logs.add_argument(
        "--attempt",
        type=_positive_int,
        default=None,
        metavar="N",
        help="only this attempt's lines (default: every attempt's)",
    )
    logs.add_argument(
        "--timestamps", action="store_true", help="start each line with its time"
    )
    logs.set_defaults(handler=_logs)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


# -- submit --------------------------------------------------------------------

_FLAG_FIELDS = (
    "command",
    "args",
    "env",
    "max_failures",
    "heartbeat_interval",
    "sync_json",
    "webhook",
    "compression",
    "name",
    "tags",
    *LEGACY_STORAGE_FIELDS,
)


def _register_submit(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    submit = subparsers.add_parser(
        "submit",
        help="queue jobs from a JSON file or from flags",
        description=(
            "Queue jobs. Either give FILE (a JSON job object, or an array of them "
            "for one batch submission; '-' reads stdin), or describe one job with "
            "flags and its command line after '--' (e.g. 'kelpie submit "
            "--container-group-id g -- python script.py --epochs 3'; or use "
            "--command and --arg). Without --sync-json or bucket/prefix flags, a "
            'job gets "sync": {} (no managed storage).'
        ),
    )
    add_api_options(submit, suppress_defaults=True)
    submit.add_argument("file", nargs="?", metavar="FILE", help="a JSON file, or -")
    submit.add_argument("--command", help="the program to run (or give it after --)")
    submit.add_argument(
        "--arg",
        dest="args",
        action="append",
        default=[],
        metavar="ARG",
        help="an argument of the program (repeat for more)",
    )
    submit.add_argument(
        "--env",
        action="append",
        type=_env_pair,
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable of the job (repeat for more)",
    )
    submit.add_argument(
        "--container-group-id",
        metavar="ID",
        help="the container group that runs it (also fills in FILE jobs lacking one)",
    )
    submit.add_argument(
        "--max-failures", type=_positive_int, help="failures before giving up (3)"
    )
    submit.add_argument(
        "--heartbeat-interval",
        type=_positive_int,
        metavar="SECONDS",
        help="seconds between heartbeats (30)",
    )
    submit.add_argument(
        "--sync-json",
        metavar="JSON",
        help="the sync block as JSON, e.g. '{\"before\": [...]}'",
    )
    submit.add_argument("--webhook", metavar="URL", help="told about status changes")
    submit.add_argument("--name", help="a short name for the job (up to 200 chars)")
    submit.add_argument(
        "--tag",
        dest="tags",
        action="append",
        default=[],
        metavar="TAG",
        help="a tag for the job, e.g. gpu or team=ml (repeat for more; up to 20)",
    )
    submit.add_argument(
        "--compression", action="store_true", default=None, help="compress uploads"
    )
    for field in LEGACY_STORAGE_FIELDS:
        submit.add_argument(
            "--" + field.replace("_", "-"),
            dest=field,
            metavar=field.rsplit("_", 1)[1].upper(),
            help=f"legacy storage: {field.replace('_', ' ')}",
        )
    submit.add_argument(
        "--json", action="store_true", help="print JSON on stdout and nothing else"
    )
    submit.set_defaults(handler=_submit, takes_command=True)


def _read_file(name: str) -> Any:
    if name == "-":
        text = sys.stdin.read()
    else:
        with open(name, encoding="utf-8") as handle:
            text = handle.read()
    return json.loads(text)


def _with_group(job: Any, group: str | None, index: int | None) -> dict[str, Any]:
    where = "the job" if index is None else f"job {index}"
    if not isinstance(job, Mapping):
        raise ValueError(f"{where} in the file is not a JSON object")
    body = dict(job)
    if group is not None and "container_group_id" not in body:
        body["container_group_id"] = group
    return body


def _submission_from_flags(args: argparse.Namespace) -> JobSubmission:
    command, arguments = args.command, args.args
    line = getattr(args, "command_line", None)
    if line is not None:
        if command or arguments:
            raise UsageError(
                "give the command either after -- or with --command/--arg, not both"
            )
        if not line:
            raise UsageError(
                "nothing after --: give the command to run, e.g. -- python script.py"
            )
        command, arguments = line[0], line[1:]
    if not command:
        raise UsageError(
            "give a FILE, or a command: -- CMD ARG... (or --command and --arg), "
            "and --container-group-id"
        )
    if not args.container_group_id:
        raise UsageError("--container-group-id is required")
    legacy = {f: getattr(args, f) for f in LEGACY_STORAGE_FIELDS}
    sync = None
    if args.sync_json is not None:
        try:
            sync_data = json.loads(args.sync_json)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--sync-json is not valid JSON: {exc}") from exc
        if not isinstance(sync_data, Mapping):
            raise UsageError("--sync-json must be a JSON object")
        from kelpie_sdk.models import SyncSpec

        sync = SyncSpec.from_json(sync_data)
    elif not any(legacy.values()):
        from kelpie_sdk.models import SyncSpec

        sync = SyncSpec()
    optional: dict[str, Any] = {
        k: v
        for k, v in {
            "max_failures": args.max_failures,
            "heartbeat_interval": args.heartbeat_interval,
            "webhook": args.webhook,
            "compression": args.compression,
            "name": args.name,
        }.items()
        if v is not None
    }
    return JobSubmission(
        command=command,
        container_group_id=args.container_group_id,
        arguments=arguments,
        environment=dict(args.env),
        tags=args.tags,
        sync=sync,
        **legacy,
        **optional,
    )


def _submit(args: argparse.Namespace, ctx: Context) -> int:
    if args.file is not None:
        used = [
            "--" + {"args": "arg"}.get(f, f).replace("_", "-")
            for f in _FLAG_FIELDS
            if getattr(args, f) not in (None, [], False)
        ]
        if used:
            raise UsageError(f"give either FILE or job flags, not both ({used[0]})")
        if getattr(args, "command_line", None) is not None:
            raise UsageError("give either FILE or a command after --, not both")
        data = _read_file(args.file)
        if isinstance(data, list):
            if not data:
                raise ValueError("the file holds an empty array: no jobs to submit")
            bodies = [
                _with_group(job, args.container_group_id, i)
                for i, job in enumerate(data)
            ]
            jobs = ctx.client().submit_jobs(bodies)
            return _show_submitted(ctx, jobs, as_list=True)
        submission = JobSubmission.from_json(
            _with_group(data, args.container_group_id, None)
        )
    else:
        submission = _submission_from_flags(args)
    fields = {f.name: getattr(submission, f.name) for f in attrs.fields(JobSubmission)}
    job = ctx.client().submit_job(**fields)
    return _show_submitted(ctx, [job], as_list=False)


def _show_submitted(ctx: Context, jobs: list[Job], *, as_list: bool) -> int:
    if ctx.args.json:
        print_json(
            ctx.console,
            [j.to_json() for j in jobs] if as_list else jobs[0].to_json(),
        )
    else:
        ctx.console.print(
            jobs_table(
                jobs,
                title=f"Submitted {len(jobs)} job(s)",
                width=ctx.console.width,
            )
        )
    return EXIT_OK


# -- jobs ------------------------------------------------------------------------


def _list(args: argparse.Namespace, ctx: Context) -> int:
    if args.watch:
        if args.json:
            raise UsageError("--watch draws a live table: leave out --json")
        return _watch(args, ctx)
    jobs = _fetch_list(args, ctx)
    if args.json:
        print_json(ctx.console, [j.to_json() for j in jobs])
    else:
        if jobs:
            ctx.console.print(jobs_table(jobs, width=ctx.console.width))
        else:
            ctx.console.print("No jobs.")
        print_unserved(ctx.console, ctx.client(), group=args.container_group_id)
    return EXIT_OK


def _fetch_list(args: argparse.Namespace, ctx: Context) -> list[Job]:
    page_size = min(args.page_size, args.limit) if args.limit else args.page_size
    paginator = ctx.client().list_jobs(
        status=args.status,
        container_group_id=args.container_group_id,
        page_size=page_size,
        asc=args.asc,
        name=args.name,
        tags=args.tags,
    )
    return list(itertools.islice(paginator, args.limit or None))


def _watch(args: argparse.Namespace, ctx: Context) -> int:
    # Ctrl-C is how a watch ends, so it is not an interruption (exit 0).
    try:
        with JobsView(ctx.console) as view:
            while True:
                view.update(_fetch_list(args, ctx))
                _sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _job_details(job: Job) -> Table:
    table = Table(show_header=False, box=None)
    table.add_column("Field", style="bold")
    table.add_column("Value", overflow="fold")
    rows: list[tuple[str, str]] = [
        ("id", job.id),
        *([("name", job.name)] if job.name else []),
        *([("tags", ", ".join(job.tags))] if job.tags else []),
        ("status", job.status.value),
        ("container group", job.container_group_id),
        ("command", " ".join([job.command, *job.arguments])),
        ("created", format_time(job.created)),
    ]
    for name in ("started", "heartbeat", "completed", "canceled", "failed"):
        value = getattr(job, name)
        if value is not None:
            rows.append((name, format_time(value)))
    rows += [
        ("failures", f"{job.num_failures}/{job.max_failures}"),
        ("heartbeats", f"{job.num_heartbeats} (every {job.heartbeat_interval} s)"),
        ("machine", job.machine_id or ""),
    ]
    if job.attempt is not None:
        rows.append(("attempt", str(job.attempt)))
    if job.num_interruptions is not None:
        rows.append(("interruptions", str(job.num_interruptions)))
    if job.goodput is not None:
        rows.append(("goodput", f"{job.goodput:.0%}"))
    if job.progress:
        rows.append(("progress", format_progress(job.progress)))
    if job.last_error:
        rows.append(("last error", job.last_error))
    if job.environment:
        rows.append(("environment", ", ".join(sorted(job.environment))))
    if job.sync is not None:
        rows.append(("sync", json.dumps(job.sync.to_json())))
    else:
        for name in LEGACY_STORAGE_FIELDS:
            value = getattr(job, name)
            if value:
                rows.append((name.replace("_", " "), value))
    if job.webhook:
        rows.append(("webhook", job.webhook))
    for key, value in rows:
        table.add_row(key, Text(value))
    return table


def _get(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    job = client.get_job(resolve_job_id(client, args.job_id))
    if args.json:
        print_json(ctx.console, job.to_json())
    else:
        ctx.console.print(_job_details(job))
    return EXIT_OK


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return ""
    if value < 60:
        return f"{value:.1f} s"
    minutes, secs = divmod(int(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def events_table(events: list[JobEvent]) -> Table:
    """
    A job's history: time, event, attempt, machine, cause, and for the event
    that ends an attempt its compute and the part of it lost.
    """
    table = Table(title="Events")
    table.add_column("Time", no_wrap=True)
    table.add_column("Event", no_wrap=True)
    table.add_column("Attempt", justify="right")
    table.add_column("Machine", overflow="fold")
    table.add_column("Cause", overflow="fold")
    table.add_column("Compute", justify="right", no_wrap=True)
    table.add_column("Lost", justify="right", no_wrap=True)
    for event in events:
        table.add_row(
            format_time(event.time),
            event.kind.replace("_", " "),
            "" if event.attempt is None else str(event.attempt),
            Text(event.machine_id or ""),
            Text(event.cause),
            _seconds(event.details.get("compute_seconds")),
            _seconds(event.details.get("lost_seconds")),
        )
    return table


def _events(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    job_id = resolve_job_id(client, args.job_id)
    events = client.events(job_id)
    if args.json:
        print_json(ctx.console, [e.to_json() for e in events])
        return EXIT_OK
    ctx.console.print(events_table(events))
    computed = [e for e in events if "compute_seconds" in e.details]
    if computed:
        total = sum(float(e.details["compute_seconds"]) for e in computed)
        lost = sum(float(e.details.get("lost_seconds") or 0) for e in computed)
        line = f"Compute {_seconds(total)} over {len(computed)} attempt(s), "
        line += f"lost {_seconds(lost)}"
        if total > 0:
            line += f"; goodput {(total - lost) / total:.0%}"
        ctx.console.print(line)
    return EXIT_OK


def _cancel(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    canceled: list[str] = []
    for given in args.job_ids:
        job_id = resolve_job_id(client, given)
        client.cancel(job_id)
        canceled.append(job_id)
        if not args.json:
            ctx.console.print(Text(f"Canceled {job_id}"))
    if args.json:
        print_json(ctx.console, {"canceled": canceled})
    return EXIT_OK


def _wait(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    ids = [resolve_job_id(client, given) for given in args.job_ids]
    if args.json:
        jobs = client.wait(ids, timeout=args.timeout, poll_interval=args.poll_interval)
        print_json(ctx.console, [j.to_json() for j in jobs])
    else:
        with JobsView(ctx.console) as view:
            jobs = client.wait(
                ids,
                timeout=args.timeout,
                poll_interval=args.poll_interval,
                on_update=view.update,
            )
        if not view.redraws:
            # The lines printed on each change end with the final table.
            ctx.console.print(jobs_table(jobs, width=ctx.console.width))
    unsuccessful = [j for j in jobs if j.status is not JobStatus.COMPLETED]
    if unsuccessful:
        detail = ", ".join(f"{j.id} ({j.status.value})" for j in unsuccessful[:5])
        print(
            f"Error: {len(unsuccessful)} of {len(jobs)} job(s) did not complete: "
            f"{detail}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return EXIT_OK


def _purge(args: argparse.Namespace, ctx: Context) -> int:
    group = args.container_group_id
    if not args.yes:
        raise UsageError(
            f"purging deletes every pending job of container group {group} and "
            "cancels its running ones: add --yes to do it"
        )
    count = ctx.client().purge_container_group(group)
    if args.json:
        print_json(ctx.console, {"container_group_id": group, "count": count})
    else:
        ctx.console.print(Text(f"Purged {count} job(s) of container group {group}"))
    return EXIT_OK


def _logs(args: argparse.Namespace, ctx: Context) -> int:
    """
    Raw lines, so that they can be piped; ``--- attempt N ---`` goes to stderr
    where the attempt changes. With ``--json``: one JSON object per line.
    A reader that goes away (``| head``) ends the command quietly.
    """
    stdout = ctx.console.file
    try:
        _print_logs(args, ctx, stdout)
    except BrokenPipeError:
        # Nothing more can be written; keep the interpreter's final flush quiet.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stdout.fileno())
    return EXIT_OK


def _print_logs(args: argparse.Namespace, ctx: Context, stdout: Any) -> None:
    attempt: int | None = None
    client = ctx.client()
    job_id = resolve_job_id(client, args.job_id)
    lines = client.logs(job_id, follow=args.follow, attempt=args.attempt)
    for line in lines:
        if args.json:
            stdout.write(json.dumps(line.to_json()) + "\n")
            stdout.flush()
            continue
        if line.attempt != attempt:
            attempt = line.attempt
            stdout.flush()
            sys.stderr.write(f"--- attempt {attempt} ---\n")
        out = stdout if line.stream == "stdout" else sys.stderr
        stamp = f"{format_time(line.time)} " if args.timestamps else ""
        out.write(f"{stamp}{line.line}\n")
        out.flush()
