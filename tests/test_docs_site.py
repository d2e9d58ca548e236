"""
The documentation site: ``mkdocs build --strict`` passes without a warning, and the
pages generated at build time cover the code they are generated from.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kelpie_sdk.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert not re.search(r"^(WARNING|ERROR)\b", log, re.M), log
    return out


@pytest.fixture(scope="module")
def hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "kelpie_docs_hooks", ROOT / "docs" / "_hooks.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def page_text(site: Path, uri: str) -> str:
    """The page's text with tags removed and entities decoded."""
    raw = (site / uri / "index.html").read_text()
    return html.unescape(re.sub(r"<[^>]+>", "", raw))


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("kelpie",)
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from commands(sub, (*path, name))


def test_strict_build_has_every_page(site: Path) -> None:
    for uri in (
        "",
        "quickstart",
        "concepts",
        "checkpointing",
        "salad",
        "autoscaling",
        "self-hosting",
        "migrating",
        "benchmarks",
        "benchmark-plots",
        "reference/cli",
        "reference/api",
        "reference/worker-environment",
    ):
        assert (site / uri / "index.html").is_file(), uri


def test_the_site_loads_nothing_from_the_network(site: Path) -> None:
    for page in site.rglob("*.html"):
        text = page.read_text()
        for tag in re.findall(r"<(?:script|link|img)\b[^>]*>", text):
            assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", tag), (
                page,
                tag,
            )


def test_cli_reference_has_every_command_and_option(site: Path) -> None:
    text = page_text(site, "reference/cli")
    found = list(commands(build_parser()))
    assert len(found) >= 8
    for words, sub in found:
        assert " ".join(words) in text, words
        for action in sub._actions:
            if action.help == argparse.SUPPRESS:
                continue
            for option in action.option_strings:
                assert option in text, (words, option)


def test_api_reference_has_every_path_of_the_openapi_document(
    site: Path, tmp_path: Path
) -> None:
    from kelpie_sdk.server import create_app, open_store

    store = open_store(f"sqlite:///{tmp_path}/openapi.db")
    try:
        document = create_app(store).openapi_schema.to_schema()
    finally:
        store.engine.dispose()
    text = page_text(site, "reference/api")
    assert len(document["paths"]) >= 10
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert f"{method.upper()} {path}" in text, (method, path)
            # Each operation is described (from its handler's docstring).
            first_line = operation.get("description", "").strip().splitlines()
            assert first_line, (method, path)
            assert first_line[0].replace("``", "")[:30] in text, (method, path)
    for name in document["components"]["schemas"]:
        assert name in text, name


def test_worker_environment_reference_lists_what_the_worker_reads_and_sets(
    site: Path,
) -> None:
    text = page_text(site, "reference/worker-environment")
    for name in (
        "KELPIE_API_URL",
        "SALAD_CONTAINER_GROUP_ID",
        "SALAD_ORGANIZATION_NAME",
        "HEARTBEAT_INTERVAL_S",
        "KELPIE_LONG_POLL_S",
        "KELPIE_SLOT_GPUS",
        "--kill-grace",
        "KELPIE_JOB_ID",
        "KELPIE_ATTEMPT",
        "KELPIE_CHECKPOINT_URL",
        "KELPIE_PROGRESS_FILE",
    ):
        assert name in text, name


def test_benchmark_plots_are_drawn_from_the_results(site: Path) -> None:
    results = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert {p.stem for p in results} >= {"server", "worker", "checkpoint", "transfer"}
    plots = sorted((site / "benchmarks" / "plots").glob("*.svg"))
    assert len(plots) >= len(results)
    page = (site / "benchmark-plots" / "index.html").read_text()
    for plot in plots:
        assert plot.read_text().lstrip().startswith("<?xml"), plot
        assert f"benchmarks/plots/{plot.name}" in page, plot.name
    # A figure of the server's results file is in its plot, as a bar label.
    server = json.loads((ROOT / "benchmarks" / "results" / "server.json").read_text())
    svg = (site / "benchmarks" / "plots" / "server.svg").read_text()
    assert f">{server['heartbeats_per_s']:,.0f}<" in svg


def test_a_variable_the_worker_sets_without_a_description_fails_the_build(
    hooks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "KELPIE_JOB_ID" in hooks.worker_environment()
    injected = dict(hooks.INJECTED)
    del injected["KELPIE_ATTEMPT"]
    monkeypatch.setattr(hooks, "INJECTED", injected)
    with pytest.raises(ValueError, match="KELPIE_ATTEMPT"):
        hooks.worker_environment()


def test_a_variable_read_but_missing_from_the_settings_table_fails_the_build(
    hooks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kelpie_sdk.worker import _config

    doc = _config.__doc__ or ""
    line = next(line for line in doc.splitlines() if "``KELPIE_SLOTS``" in line)
    monkeypatch.setattr(_config, "__doc__", doc.replace(line + "\n", ""))
    with pytest.raises(ValueError, match="undocumented \\['KELPIE_SLOTS'\\]"):
        hooks.worker_environment()


def test_settings_table_folds_continuation_lines(hooks: Any) -> None:
    doc = """
    ======  ==================  =======
    Name    Variable            Default
    ======  ==================  =======
    ``a``   ``A_ONE``,          1
            else ``A_TWO``
    ``b``   ``B``               none
    ======  ==================  =======
    """
    rows = hooks.settings_table(doc)
    assert [("a", ["A_ONE", "A_TWO"], "1"), ("b", ["B"], "none")] == rows


def test_table_cells_escape_html_outside_code_only(hooks: Any) -> None:
    assert "a -&gt; b `<x>` c \\| d" == hooks.cell("a -> b `<x>` c | d")
