"""
MkDocs hooks that generate pages and plots from the code at build time.

- ``reference/cli.md``: every command and option of the ``kelpie`` parser.
- ``reference/api.md``: the server's OpenAPI document (the ``/openapi.json`` that
  ``kelpie server`` serves), rendered to Markdown; no network, no JavaScript.
- ``reference/worker-environment.md``: the variables the worker reads (from the
  settings table of ``kelpie_sdk.worker._config`` and the worker's flags) and the
  ones it sets for each job (from the source of ``_JobRun.environment``).
- ``benchmarks/plots/*.svg``: plots drawn with matplotlib from the result files
  the benchmark scripts write with ``--json`` (``benchmarks/results/*.json``).

A page that cannot be generated fails the build: a reference that drifted from
the code is an error, not a warning.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import json
import os
import re
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GENERATED_NOTE = (
    "!!! note\n    This page is generated from {source} when the site is built.\n"
)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    pages = {
        "reference/cli.md": cli_reference(),
        "reference/api.md": api_reference(),
        "reference/worker-environment.md": worker_environment(),
    }
    for uri, text in pages.items():
        files.append(File.generated(config, uri, content=text))
    for name, svg in benchmark_plots().items():
        files.append(File.generated(config, f"benchmarks/plots/{name}", content=svg))
    return files


# -- Markdown helpers ------------------------------------------------------------------


def cell(text: object) -> str:
    """One table cell: a single line, with Markdown's and HTML's specials escaped."""
    value = " ".join(str(text).split()).replace("|", "\\|")
    # Code spans show their text as is; elsewhere < and > would be read as HTML.
    parts = re.split(r"(`[^`]*`)", value)
    return "".join(
        part if part.startswith("`") else part.replace("<", "&lt;").replace(">", "&gt;")
        for part in parts
    )


def code_cell(text: str) -> str:
    """A cell in code font; a backtick inside gets a wider fence."""
    value = " ".join(text.split()).replace("|", "\\|")
    fence = "``" if "`" in value else "`"
    return f"{fence}{value}{fence}" if fence == "`" else f"{fence} {value} {fence}"


def rst_to_md(text: str) -> str:
    """Docstrings use reStructuredText's double backticks; Markdown uses one."""
    return re.sub(r"``(.+?)``", r"`\1`", inspect.cleandoc(text))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# -- CLI reference ---------------------------------------------------------------------


def _subcommands(
    parser: argparse.ArgumentParser,
) -> list[tuple[str, str | None, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each direct subcommand, in help order."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:  # an alias
                    continue
                seen.add(id(sub))
                out.append((name, helps.get(name), sub))
    return out


def walk_commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("kelpie",)
) -> list[tuple[tuple[str, ...], str | None, argparse.ArgumentParser]]:
    """Every command of the parser, depth first: (words, help, parser)."""
    found: list[tuple[tuple[str, ...], str | None, argparse.ArgumentParser]] = []
    for name, help_text, sub in _subcommands(parser):
        found.append(((*path, name), help_text, sub))
        found.extend(walk_commands(sub, (*path, name)))
    return found


def _argument_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            takes_value = action.nargs != 0
            metavar = action.metavar or action.dest.upper()
            if isinstance(metavar, tuple):
                metavar = " ".join(metavar)
            names = ", ".join(
                f"{opt} {metavar}" if takes_value else opt
                for opt in action.option_strings
            )
        else:
            names = str(action.metavar or action.dest)
            if action.nargs in ("?", "*"):
                names = f"[{names}]"
        default = action.default
        shown = (
            ""
            if default in (None, False, argparse.SUPPRESS, [])
            or isinstance(action, argparse._CountAction)
            else code_cell(str(default))
        )
        choices = ""
        if action.choices and not isinstance(action.choices, dict):
            choices = " (one of " + ", ".join(f"`{c}`" for c in action.choices) + ")"
        rows.append(
            f"| {code_cell(names)} | {cell(action.help or '')}{choices} | {shown} |"
        )
    return rows


def _usage(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "88"
    try:
        usage = parser.format_usage()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    # Continuation lines are indented for the "usage: " prefix, which goes.
    prefix = "usage: "
    lines = usage.removeprefix(prefix).rstrip().splitlines()
    return "\n".join(
        [lines[0], *(line.removeprefix(" " * len(prefix)) for line in lines[1:])]
    )


def cli_reference() -> str:
    from kelpie_sdk.cli import build_parser

    parser = build_parser()
    out = [
        "# Command line: every option",
        "",
        GENERATED_NOTE.format(source="the `kelpie` command's own parser"),
        "For worked examples, see [the command-line guide](../cli.md). "
        "Every command also answers `--help`.",
        "",
        "## kelpie",
        "",
        cell(parser.description or ""),
        "",
        "```text",
        _usage(parser),
        "```",
        "",
        "| Option | Meaning | Default |",
        "|---|---|---|",
        *_argument_rows(parser),
        "",
        "| Command | What it does |",
        "|---|---|",
    ]
    commands = walk_commands(parser)
    for words, help_text, _ in commands:
        if len(words) == 2:
            anchor = slug(" ".join(words))
            out.append(f"| [`{words[1]}`](#{anchor}) | {cell(help_text or '')} |")
    out.append("")
    for words, help_text, sub in commands:
        title = " ".join(words)
        out += [f"## {title} {{#{slug(title)}}}", ""]
        text = sub.description or help_text or ""
        if text:
            out += [cell(text), ""]
        out += ["```text", _usage(sub), "```", ""]
        children = _subcommands(sub)
        if children:
            out += ["| Command | What it does |", "|---|---|"]
            for name, child_help, _ in children:
                anchor = slug(f"{title} {name}")
                out.append(f"| [`{name}`](#{anchor}) | {cell(child_help or '')} |")
            out.append("")
        rows = _argument_rows(sub)
        if rows:
            out += ["| Argument | Meaning | Default |", "|---|---|---|", *rows, ""]
    return "\n".join(out)


# -- HTTP API reference ----------------------------------------------------------------


def openapi_document() -> dict[str, Any]:
    """The document ``GET /openapi.json`` serves, from an app on a scratch database."""
    from kelpie_sdk.server import create_app, open_store

    with tempfile.TemporaryDirectory(prefix="kelpie-docs-") as tmp:
        store = open_store(f"sqlite:///{tmp}/openapi.db")
        try:
            document: dict[str, Any] = create_app(store).openapi_schema.to_schema()
        finally:
            store.engine.dispose()
    return document


def schema_type(schema: dict[str, Any]) -> str:
    """A short Markdown rendering of a JSON schema's type."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{slug('schema ' + name)})"
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return " or ".join(schema_type(s) for s in schema[key])
    if "enum" in schema:
        return "one of " + ", ".join(f"`{v}`" for v in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(
            schema_type({**schema, "type": k}) if k == "array" else f"`{k}`"
            for k in kind
        )
    if kind == "array":
        return f"array of {schema_type(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        values = schema["additionalProperties"]
        return f"object of {schema_type(values)}" if values else "`object`"
    if kind:
        fmt = schema.get("format")
        return f"`{kind}` ({fmt})" if fmt else f"`{kind}`"
    return "any"


def _described(schema: dict[str, Any]) -> str:
    """A field's description, and its default when the schema gives one."""
    text = cell(schema.get("description", ""))
    if "default" in schema:
        default = code_cell(json.dumps(schema["default"]))
        text = f"{text} (default {default})" if text else f"default {default}"
    return text


def _operation(path: str, method: str, op: dict[str, Any]) -> list[str]:
    anchor = slug(f"{method} {path}")
    out = [f"### {method.upper()} `{path}` {{#{anchor}}}", ""]
    if op.get("description"):
        out += [rst_to_md(op["description"]), ""]
    elif op.get("summary"):
        out += [op["summary"], ""]
    params = op.get("parameters", [])
    if params:
        out += [
            "| Parameter | In | Type | Required | Description |",
            "|---|---|---|---|---|",
        ]
        for p in params:
            out.append(
                f"| `{p['name']}` | {p['in']} | {schema_type(p.get('schema', {}))} "
                f"| {'yes' if p.get('required') else 'no'} "
                f"| {_described({**p.get('schema', {}), **p})} |"
            )
        out.append("")
    body = op.get("requestBody")
    if body:
        for media, content in body.get("content", {}).items():
            out += [
                f"Request body ({media}): {schema_type(content.get('schema', {}))}.",
                "",
            ]
    responses = op.get("responses", {})
    if responses:
        out += ["| Status | Meaning | Body |", "|---|---|---|"]
        for code, resp in responses.items():
            bodies = [
                schema_type(c.get("schema", {}))
                for c in resp.get("content", {}).values()
            ]
            out.append(
                f"| {code} | {cell(resp.get('description', ''))} "
                f"| {', '.join(bodies) or 'none'} |"
            )
        out.append("")
    return out


def _component(name: str, schema: dict[str, Any]) -> list[str]:
    out = [f"### {name} {{#{slug('schema ' + name)}}}", ""]
    if schema.get("description"):
        out += [rst_to_md(schema["description"]), ""]
    props = schema.get("properties")
    if props:
        required = set(schema.get("required", []))
        out += ["| Field | Type | Required | Description |", "|---|---|---|---|"]
        for field, sub in props.items():
            out.append(
                f"| `{field}` | {schema_type(sub)} "
                f"| {'yes' if field in required else 'no'} "
                f"| {_described(sub)} |"
            )
        out.append("")
    else:
        out += [f"Type: {schema_type(schema)}.", ""]
    return out


def _summary(op: dict[str, Any]) -> str:
    """The first paragraph of an operation's description, else its summary."""
    description = rst_to_md(op.get("description", ""))
    first = description.split("\n\n", 1)[0]
    return cell(first or op.get("summary", ""))


def api_reference(document: dict[str, Any] | None = None) -> str:
    doc = openapi_document() if document is None else document
    info = doc.get("info", {})
    out = [
        "# HTTP API",
        "",
        GENERATED_NOTE.format(
            source="the OpenAPI document that `kelpie server` serves at `/openapi.json`"
        ),
        f"{info.get('title', '')}, version {info.get('version', '')}, "
        f"OpenAPI {doc.get('openapi', '')}. {info.get('description', '')}",
        "",
        "A running server also serves this document at `/openapi.json` and an "
        "interactive explorer at `/docs`. Behaviour beyond the schema (errors, "
        "fencing, long polls) is described in [the API server](../server.md).",
        "",
        "## Endpoints",
        "",
        "| Method | Path | Summary |",
        "|---|---|---|",
    ]
    paths: dict[str, dict[str, Any]] = doc.get("paths", {})
    for path, ops in paths.items():
        for method, op in ops.items():
            anchor = slug(f"{method} {path}")
            out.append(f"| {method.upper()} | [`{path}`](#{anchor}) | {_summary(op)} |")
    out.append("")
    for path, ops in paths.items():
        for method, op in ops.items():
            out += _operation(path, method, op)
    schemas = doc.get("components", {}).get("schemas", {})
    if schemas:
        out += ["## Schemas", ""]
        for name, schema in schemas.items():
            out += _component(name, schema)
    return "\n".join(out)


# -- Worker environment ----------------------------------------------------------------


#: What the worker sets in each job's environment, by variable.
INJECTED = {
    "KELPIE_JOB_ID": "The job's id.",
    "KELPIE_ATTEMPT": "The attempt number the server gave this run of the job.",
    "INPUT_DIR": (
        "Legacy mode only: the slot's input directory (inputs are downloaded here)."
    ),
    "OUTPUT_DIR": (
        "Legacy mode only: the slot's output directory (uploaded when the job "
        "succeeds)."
    ),
    "CHECKPOINT_DIR": (
        "Legacy mode only: the slot's checkpoint directory (snapshotted to the "
        "checkpoint prefix)."
    ),
    "KELPIE_STATE_FILE": "The slot's state file, which the worker owns.",
    "KELPIE_PROGRESS_FILE": (
        "Where the job may write its progress record; `kelpie_sdk.checkpoint` "
        "does so on each save."
    ),
    "KELPIE_CHECKPOINT_URL": (
        "The storage URL of the job's checkpoints; `kelpie_sdk.checkpoint."
        "Checkpointer()` saves there by default. Every job gets one: its own "
        "checkpoint prefix or `sync.during` location, else a per-job prefix under "
        "the worker's storage, else (with a warning) a private directory on the "
        "node."
    ),
    "KELPIE_OUTPUT_URL": (
        "The storage URL of the job's outputs. Set when the job has an output location."
    ),
    "CUDA_VISIBLE_DEVICES": "The slot's GPUs, when `--slot-gpus` pins them.",
}

#: What the settings without a flag mean, by setting.
UNFLAGGED = {
    "salad_api_key": "a SaladCloud API key, used when there is no Kelpie API key",
    "salad_organization": "the SaladCloud organization, with `SALAD_API_KEY`",
    "salad_project": "the SaladCloud project, with `SALAD_API_KEY`",
}


def settings_table(doc: str) -> list[tuple[str, list[str], str]]:
    """
    Parse the reStructuredText simple table of a module docstring.

    Returns:
        (setting, variables, default) per row; a row's continuation lines (a
        second variable read when the first is unset) are folded in.
    """
    lines = inspect.cleandoc(doc).splitlines()
    borders = [i for i, line in enumerate(lines) if re.fullmatch(r"=+( +=+)+", line)]
    if len(borders) != 3:
        raise ValueError("expected one reStructuredText table in the docstring")
    starts = [m.start() for m in re.finditer(r"=+", lines[borders[0]])]

    def split(line: str) -> list[str]:
        bounds = [*starts[1:], None]
        return [line[a:b].strip() for a, b in zip(starts, bounds, strict=True)]

    rows: list[tuple[str, list[str], str]] = []
    for line in lines[borders[1] + 1 : borders[2]]:
        setting, variable, default = split(line)
        names = re.findall(r"``([A-Z0-9_]+)``", variable)
        if setting:
            rows.append((setting.strip("`"), names, default))
        elif rows:
            rows[-1][1].extend(names)
    return rows


def _env_names_read(func: Any) -> set[str]:
    """
    The upper-case string constants a function's source mentions, literally or
    through a module-level constant (``DEFAULT_URL_VAR``).
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    module_globals = getattr(func, "__globals__", {})
    values = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            values.add(node.value)
        elif isinstance(node, ast.Name) and node.id.isupper():
            values.add(module_globals.get(node.id))
    return {
        value
        for value in values
        if isinstance(value, str) and re.fullmatch(r"[A-Z][A-Z0-9_]+", value)
    }


def injected_names() -> set[str]:
    """The variables ``_JobRun.environment`` sets for the job."""
    from kelpie_sdk.worker import _agent

    return _env_names_read(_agent._JobRun.environment)


def worker_environment() -> str:
    from kelpie_sdk import config as api_config
    from kelpie_sdk.worker import _config
    from kelpie_sdk.worker._main import _FIELDS, build_parser

    rows = settings_table(_config.__doc__ or "")
    documented = {name for _, names, _ in rows for name in names}
    read = _env_names_read(_config.WorkerConfig.from_env) | {
        api_config.API_URL_ENV,
        api_config.API_KEY_ENV,
        api_config.SALAD_API_KEY_ENV,
        *api_config.SALAD_ORGANIZATION_ENVS,
        *api_config.SALAD_PROJECT_ENVS,
    }
    if documented != read:
        raise ValueError(
            "the worker's settings table and the variables it reads differ: "
            f"undocumented {sorted(read - documented)}, "
            f"not read {sorted(documented - read)}"
        )
    flags: dict[str, tuple[str, str]] = {}
    for action in build_parser()._actions:
        field = _FIELDS.get(action.dest)
        if field and action.option_strings:
            meaning = re.sub(r"\s*\([^()]*\)$", "", action.help or "")
            flags[field] = (action.option_strings[0], meaning)
    out = [
        "# Worker environment",
        "",
        GENERATED_NOTE.format(
            source="the worker's settings table, its flags and its source"
        ),
        "See [the worker agent](../worker.md) for how these are used.",
        "",
        "## What the worker reads",
        "",
        "A flag of `kelpie worker` overrides its variable. "
        "Where two variables are listed, the second is read when the first is unset.",
        "",
        "| Variable | Flag | Default | Meaning |",
        "|---|---|---|---|",
    ]
    for setting, names, default in rows:
        flag, meaning = flags.get(setting, ("", UNFLAGGED.get(setting, "")))
        if not meaning:
            raise ValueError(f"no description for the worker setting {setting!r}")
        variables = ", ".join(f"`{n}`" for n in names)
        out.append(
            f"| {variables} | {code_cell(flag) if flag else ''} "
            f"| {cell(rst_to_md(default))} | {cell(meaning)} |"
        )
    injected = injected_names()
    if injected != set(INJECTED):
        raise ValueError(
            "the variables the worker sets for a job changed: "
            f"undocumented {sorted(injected - set(INJECTED))}, "
            f"no longer set {sorted(set(INJECTED) - injected)}; update INJECTED"
        )
    out += [
        "",
        "## What the worker sets for each job",
        "",
        "The job's environment is the worker's, overlaid by the job's own "
        "`environment`, overlaid by these:",
        "",
        "| Variable | Value |",
        "|---|---|",
        *(f"| `{name}` | {cell(text)} |" for name, text in INJECTED.items()),
        "",
    ]
    return "\n".join(out)


# -- Benchmark plots -------------------------------------------------------------------


def _load(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _svg(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    return buf.getvalue().encode()


def number(value: float) -> str:
    """A bar's label: whole numbers from 100 up, three significant digits below."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _hbar(
    labels: list[str], series: dict[str, list[float]], xlabel: str, title: str
) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(labels) * len(series) + 1.4))
    height = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ys = [y + i * height for y in range(len(labels))]
        bars = ax.barh(ys, values, height=height, label=name)
        ax.bar_label(bars, labels=[number(v) for v in values], padding=3, fontsize=8)
    ax.set_yticks([y + height * (len(series) - 1) / 2 for y in range(len(labels))])
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.margins(x=0.15)
    if len(series) > 1:
        ax.legend(loc="lower right", fontsize=8)
    return _svg(fig)


def benchmark_plots() -> dict[str, bytes]:
    """One SVG per benchmark result file, by file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "kelpie-docs"  # stable ids: same input, same SVG
    plt.rcParams["svg.fonttype"] = "none"  # text stays text, in the page's font
    plots: dict[str, bytes] = {}

    server = _load("server")
    plots["server.svg"] = _hbar(
        [
            "store, no HTTP: claim+complete",
            "HTTP no-op (GET /health)",
            "HTTP claim+complete",
            "HTTP heartbeats",
        ],
        {
            "per second": [
                server["db_jobs_per_s"],
                server["noop_requests_per_s"],
                server["claim_complete_jobs_per_s"],
                server["heartbeats_per_s"],
            ]
        },
        "operations per second (higher is better)",
        f"API server on SQLite, {server['args']['clients']} client processes",
    )

    ckpt = _load("checkpoint")
    backends = ckpt["backends"]
    names = list(backends)
    plots["checkpoint-blocked.svg"] = _hbar(
        names,
        {
            "plain in-memory copy": [backends[n]["copy_s"] for n in names],
            "blocked in async save()": [backends[n]["blocked_s"] for n in names],
        },
        "seconds the training loop waits (lower is better)",
        f"Async checkpoint save, {ckpt['args']['mb']} MiB state",
    )
    plots["checkpoint-total.svg"] = _hbar(
        names,
        {
            "baseline (torch.save, + upload on S3)": [
                backends[n]["baseline_total_s"] for n in names
            ],
            "blocking save()": [backends[n]["save_total_s"] for n in names],
            "incremental save, 10% changed": [
                backends[n]["incremental_s"] for n in names
            ],
        },
        "seconds (lower is better)",
        f"Checkpoint save time, {ckpt['args']['mb']} MiB state",
    )

    transfer = _load("transfer")
    rows = transfer["rows"]
    plots["transfer.svg"] = _hbar(
        [f"{r['files']} {r['transfer']}\nvs {r['baseline']}" for r in rows],
        {
            "kelpie_sdk.storage": [r["ours_mib_s"] for r in rows],
            "baseline": [r["baseline_mib_s"] for r in rows],
        },
        "MiB/s (higher is better)",
        "Storage transfers",
    )

    worker = _load("worker")
    latency = worker["latency_ms"]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    labels = {
        "long_poll_claimed": "long-poll: claimed",
        "long_poll_process_started": "long-poll: job process started",
        "polling_claimed": "10 s polling: claimed",
        "polling_process_started": "10 s polling: job process started",
    }
    for key, label in labels.items():
        values = sorted(latency[key])
        fractions = [(i + 1) / len(values) for i in range(len(values))]
        style = "--" if key.endswith("process_started") else "-"
        ax.step(values, fractions, style, where="post", label=label, marker="o", ms=3)
    ax.set_xscale("log")
    ax.set_xlabel("submit to running, ms (log scale; left is better)")
    ax.set_ylabel("fraction of jobs")
    ax.set_title("Worker: time from submit to running on an idle worker")
    ax.legend(fontsize=8, loc="lower right")
    plots["worker-latency.svg"] = _svg(fig)
    return plots
