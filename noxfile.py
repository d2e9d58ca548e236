"""
Project automation: ``nox -s lint typing tests`` is what CI runs.
"""

from __future__ import annotations

import pathlib
import shutil

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "uv|venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_external_run = True
nox.options.sessions = ["lint", "typing", "tests"]

PYPROJECT = nox.project.load_toml("pyproject.toml")


def groups(*names: str) -> list[str]:
    return list(nox.project.dependency_groups(PYPROJECT, *names))


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff (lint and format) and the import-layer contracts."""
    session.install("-e", ".", *groups("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("lint-imports")


@nox.session
def typing(session: nox.Session) -> None:
    """mypy --strict over the package."""
    session.install("-e", ".[all]", *groups("typing"))
    session.run("mypy")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, with coverage, against real loopback servers."""
    session.install("-e", ".[all]", *groups("tests"))
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *session.posargs)
    session.run("coverage", "combine", success_codes=[0, 1])
    session.run("coverage", "report")


@nox.session
def build(session: nox.Session) -> None:
    """Build the wheel, install it outside the checkout and smoke-test it."""
    shutil.rmtree("dist", ignore_errors=True)
    session.install("build")
    session.run("python", "-m", "build")
    wheel = str(next(pathlib.Path("dist").glob("*.whl")))
    session.install(f"{wheel}[all]")
    session.chdir(session.create_tmp())
    session.run("kelpie", "--help")
    session.run("python", "-c", "import kelpie_sdk.checkpoint")
    # The web dashboard's pages travel inside the package.
    session.run(
        "python",
        "-c",
        "from importlib.resources import files; "
        "assert files('kelpie_sdk.server').joinpath('ui', 'app.js').is_file()",
    )
    # kelpie demo's example job kinds run from the copies the wheel carries.
    session.run(
        "python",
        "-c",
        "from kelpie_sdk.chaos_jobs import JOB_KINDS, example_path; "
        "assert {'monte_carlo', 'pytorch'} <= set(JOB_KINDS); "
        "assert '_examples' in str(example_path('train.py'))",
    )
