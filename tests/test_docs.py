"""
The documentation runs: every code block in README.md and docs/*.md, and every link.

Conventions (also for new blocks):

- Every fenced block has a language. ``python``/``py`` blocks and shell blocks
  (``console``, ``bash``, ``sh``, ``shell``) are executed; use ``text``, ``json``,
  ``http``... for output samples and wire examples, which are not.
- ``<!-- docs-test: skip: REASON -->`` on the line right above the opening fence:
  the block is not run (it needs a real cloud, runs until stopped...). REASON must
  say why, and where possible which test covers it instead.
- ``<!-- docs-test: prelude: NAME -->`` on that line: the block runs with the
  prelude ``NAME`` from `PRELUDES` below: code run first (definitions that a
  fragment leaves out) and a check run afterwards (that the block did what it says).
- Python blocks run in a fresh interpreter, shell blocks in ``bash`` with ``set -e``
  and ``pipefail``, each in its own empty working directory, with the virtualenv's
  ``python`` and ``kelpie`` first on ``PATH`` and ``KELPIE_API_URL`` /
  ``KELPIE_API_KEY`` pointing at a real API server (one for the module). Preludes
  marked ``worker`` also get a real ``kelpie worker`` serving the queue ``my-gpus``,
  whose working directory holds ``train.py``: the README's checkpoint recipe.
- In ``console`` blocks, lines starting with ``$ `` are commands (a trailing ``\\``
  continues one on the next line); the other lines show sample output and are not
  compared. Every command must succeed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from kelpie_sdk.testing import ServerHandle, run_server

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINKED_FILES = [*DOC_FILES, REPO / "CHANGELOG.md"]
#: Pages that docs/_hooks.py generates when the site is built (the strict site build
#: in tests/test_docs_site.py checks links into them).
GENERATED_PAGES = frozenset(
    REPO / "docs" / uri
    for uri in re.findall(
        r'"(reference/[\w-]+\.md)"', (REPO / "docs/_hooks.py").read_text()
    )
)
PYTHON = frozenset({"python", "py"})
SHELL = frozenset({"console", "bash", "sh", "shell"})
BLOCK_TIMEOUT = 90
WORKER_GROUP = "my-gpus"
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([^\s`]*)")
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<kind>[\w-]+)\s*:(?P<arg>.*?)-->\s*$")
REFERENCE_NAMES = (
    "kelpie-protocol.md",
    "checkpoint-anchors.md",
    "queue-anchors.md",
    "house-style.md",
)


@attrs.frozen
class Prelude:
    """
    What a block needs around it.

    Attributes:
        before: Code run first, in the block's language, in the same process.
        check: Python run afterwards in the same directory and environment: it
            asserts that the block did what its text says.
        worker: Start the module's worker before the block runs.
    """

    before: str = ""
    check: str = ""
    worker: bool = False


_RECIPE_BEFORE = """
total = 5


def init_state():
    return {"done": 0}


def train_one_step(state):
    state["done"] += 1
"""

_RECIPE_CHECK = """
from kelpie_sdk import checkpoint

ckpt = checkpoint.Checkpointer()
assert 5 == ckpt.latest_step(), ckpt.steps()
assert {"done": 5} == ckpt.load()
"""

_ALL_SUBMITTED_COMPLETED = f"""
from kelpie_sdk import Client

with Client() as client:
    jobs = list(client.list_jobs(container_group_id={WORKER_GROUP!r}))
assert jobs, "no job was submitted"
assert all(job.status == "completed" for job in jobs), [
    (job.id, job.status, job.last_error) for job in jobs
]
"""

PRELUDES: dict[str, Prelude] = {
    # The checkpoint recipe: a loop of `total` steps over a dict.
    "recipe": Prelude(before=_RECIPE_BEFORE, check=_RECIPE_CHECK),
    # A SIGTERM arrives during step 3 of 10; the loop saves step 3 and exits.
    "preemption": Prelude(
        before="""
import os, signal

total = 10
state = {"done": 0}


def train_one_step(state):
    state["done"] += 1
    if state["done"] == 3:
        os.kill(os.getpid(), signal.SIGTERM)
""",
        check="""
from kelpie_sdk import checkpoint

ckpt = checkpoint.Checkpointer()
assert [3] == ckpt.steps(), ckpt.steps()
assert {"done": 3} == ckpt.load()
""",
    ),
    # Jobs submitted to the queue of the module's worker, which runs train.py.
    "submit": Prelude(check=_ALL_SUBMITTED_COMPLETED, worker=True),
    # A client and a queue, as after the quickstart.
    "client": Prelude(
        before=f"""
from kelpie_sdk import Client

client = Client()
group = {WORKER_GROUP!r}
"""
    ),
    "progress": Prelude(
        before="""
import os

from kelpie_sdk import checkpoint

os.environ["KELPIE_PROGRESS_FILE"] = "progress.json"
step, total, loss = 10, 100, 0.25
""",
        check="""
import json

record = json.load(open("progress.json"))
assert (10, 100, 0.1) == (record["step"], record["total"], record["fraction"])
assert {"loss": 0.25} == record["metrics"]
""",
    ),
    # A file:// storage root holding my-bucket/jobs/42/input/, and an output dir.
    "storage": Prelude(
        before="""
import os
from pathlib import Path

Path("store/my-bucket/jobs/42/input/data").mkdir(parents=True)
Path("store/my-bucket/jobs/42/input/data/a.csv").write_text("1,2\\n")
Path("output").mkdir()
Path("output/result.txt").write_text("42\\n")
os.environ["KELPIE_STORAGE_URL"] = Path("store").absolute().as_uri()
""",
        check="""
from pathlib import Path

assert "1,2\\n" == Path("input/data/a.csv").read_text()
assert "42\\n" == Path("store/my-bucket/jobs/42/output/result.txt").read_text()
""",
    ),
    # Job files for `kelpie submit FILE`.
    "job-files": Prelude(
        before="""
echo '[{"command": "python", "arguments": ["train.py"], "sync": {}}]' > jobs.json
echo '{"command": "python", "container_group_id": "7d6e...", "sync": {}}' > job.json
"""
    ),
}


@attrs.frozen
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int
    lang: str
    code: str
    marker: str | None
    marker_arg: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def find_blocks(path: Path) -> list[Block]:
    """Return the fenced blocks of a Markdown file, with the marker above each."""
    lines = path.read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence, lang = match.groups()
        start = i
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        above = MARKER.match(lines[start - 1]) if start else None
        blocks.append(
            Block(
                path=path,
                line=start + 1,
                lang=lang.lower(),
                code=textwrap.dedent("\n".join(body) + "\n"),
                marker=above["kind"] if above else None,
                marker_arg=above["arg"].strip() if above else "",
            )
        )
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in find_blocks(path)]
RUN_BLOCKS = [
    block
    for block in ALL_BLOCKS
    if block.marker != "skip" and (block.lang in PYTHON | SHELL or not block.lang)
]


def console_commands(code: str) -> str:
    """The commands of a console block: ``$ `` lines and their continuations."""
    commands = []
    continued = False
    for line in code.splitlines():
        if continued:
            commands.append(line)
        elif line.startswith("$ "):
            commands.append(line[2:])
        else:
            continue
        continued = line.endswith("\\")
    return "\n".join(commands) + "\n"


# -- the shared server and worker --------------------------------------------------


@attrs.define
class DocsEnv:
    """The module's server, the environment of every block, the lazy worker."""

    server: ServerHandle
    root: Path
    env: dict[str, str]
    worker: subprocess.Popen[bytes] | None = None

    def start_worker(self) -> None:
        if self.worker is not None:
            assert self.worker.poll() is None, self.worker_log()
            return
        home = self.root / "worker"
        home.mkdir()
        (home / "train.py").write_text(recipe_script())
        env = {
            **self.env,
            "SALAD_CONTAINER_GROUP_ID": WORKER_GROUP,
            "SALAD_MACHINE_ID": "docs-worker",
            "KELPIE_STATE_FILE": str(home / "state.json"),
            "KELPIE_STORAGE_URL": (self.root / "storage").as_uri(),
            "INPUT_DIR": str(home / "input"),
            "OUTPUT_DIR": str(home / "output"),
            "CHECKPOINT_DIR": str(home / "checkpoint"),
            "KELPIE_LONG_POLL_S": "5",
            "KELPIE_KILL_GRACE_S": "5",
        }
        with (self.root / "worker.log").open("wb") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "kelpie_sdk.worker"],
                env=env,
                cwd=home,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def worker_log(self) -> str:
        path = self.root / "worker.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.worker is None or self.worker.poll() is not None:
            return
        self.worker.send_signal(signal.SIGTERM)
        try:
            self.worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.worker.kill()
            self.worker.wait(timeout=10)


def recipe_script() -> str:
    """train.py: the README's checkpoint recipe, with its prelude and its check."""
    readme = [b for b in ALL_BLOCKS if b.path.name == "README.md"]
    recipe = next(
        b for b in readme if (b.marker, b.marker_arg) == ("prelude", "recipe")
    )
    prelude = PRELUDES["recipe"]
    return prelude.before + recipe.code + prelude.check


@pytest.fixture(scope="module")
def docs_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DocsEnv]:
    """One API server (and, on demand, one worker) for all the blocks."""
    root = tmp_path_factory.mktemp("docs")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("KELPIE_", "SALAD_"))
    }
    with run_server() as server:
        env.update(
            KELPIE_API_URL=server.url,
            KELPIE_API_KEY=server.admin_key,
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            PYTHONUNBUFFERED="1",
        )
        docs = DocsEnv(server, root, env)
        try:
            yield docs
        finally:
            docs.stop()


# -- the tests -----------------------------------------------------------------------


def _fail(block: Block, why: str, output: str = "") -> None:
    pytest.fail(
        f"{block.where}: {why}\n"
        "Make the block run as written (see the conventions in tests/test_docs.py), "
        "or put `<!-- docs-test: skip: REASON -->` on the line above its fence."
        + (f"\n--- output ---\n{output}" if output else ""),
        pytrace=False,
    )


def _run(
    block: Block, argv: list[str], cwd: Path, env: dict[str, str], what: str
) -> None:
    try:
        result = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        _fail(
            block, f"{what} ran for more than {BLOCK_TIMEOUT} s", str(exc.output or "")
        )
        return
    if result.returncode != 0:
        _fail(
            block,
            f"{what} exited with {result.returncode}",
            result.stdout + result.stderr,
        )


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.where for b in RUN_BLOCKS])
def test_block_runs(block: Block, docs_env: DocsEnv, tmp_path: Path) -> None:
    """The block runs and does what its prelude's check expects."""
    if not block.lang:
        _fail(block, "the block has no language (```python, ```bash, ```text...)")
    prelude = Prelude()
    if block.marker == "prelude":
        if block.marker_arg not in PRELUDES:
            _fail(
                block,
                f"unknown prelude {block.marker_arg!r}; "
                f"tests/test_docs.py defines {sorted(PRELUDES)}",
            )
        prelude = PRELUDES[block.marker_arg]
    elif block.marker is not None:
        _fail(block, f"unknown docs-test marker {block.marker!r}")
    if prelude.worker:
        docs_env.start_worker()
    if block.lang in PYTHON:
        script = tmp_path / "block.py"
        script.write_text(prelude.before + block.code)
        argv = [sys.executable, str(script)]
    else:
        code = console_commands(block.code) if block.lang == "console" else block.code
        if not code.strip():
            _fail(block, "a console block without a `$ ` command line")
        script = tmp_path / "block.sh"
        script.write_text("set -eo pipefail\n" + prelude.before + code)
        argv = ["bash", str(script)]
    work = tmp_path / "work"
    work.mkdir()
    env = dict(docs_env.env)
    try:
        _run(block, argv, work, env, "the block")
        if prelude.check:
            check = tmp_path / "check.py"
            check.write_text(textwrap.dedent(prelude.check))
            _run(block, [sys.executable, str(check)], work, env, "the check after it")
    except pytest.fail.Exception:
        if prelude.worker:
            print(docs_env.worker_log())
        raise


def test_markers_are_well_formed() -> None:
    """Every docs-test marker sits above a fence; a skip says why."""
    problems = []
    for path in DOC_FILES:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if "docs-test" not in line:
                continue
            match = MARKER.match(line)
            where = f"{path.relative_to(REPO)}:{number}"
            if match is None:
                problems.append(f"{where}: write `<!-- docs-test: skip: REASON -->`")
                continue
            following = lines[number] if number < len(lines) else ""
            if FENCE.match(following) is None:
                problems.append(f"{where}: the marker must be right above a fence")
            if match["kind"] not in ("skip", "prelude"):
                problems.append(f"{where}: unknown marker {match['kind']!r}")
            if not match["arg"].strip():
                problems.append(f"{where}: {match['kind']} needs a reason or a name")
            for quoted, name in POINTER.findall(match["arg"]):
                target = REPO / quoted
                if not target.exists():
                    problems.append(f"{where}: no such path {quoted}")
                elif name and f"def {name}(" not in target.read_text():
                    problems.append(f"{where}: no test {name} in {quoted}")
    assert not problems, "\n".join(problems)


def test_every_block_has_a_language() -> None:
    """Skipped blocks too: a block without a language is never run by mistake."""
    bare = [b.where for b in ALL_BLOCKS if not b.lang]
    assert not bare, f"blocks without a language: {bare}"


def test_every_prelude_is_used() -> None:
    """A prelude that no block names is dead code."""
    used = {b.marker_arg for b in ALL_BLOCKS if b.marker == "prelude"}
    assert set(PRELUDES) == used


# -- links and references --------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
POINTER = re.compile(
    r"\b((?:docs|tests|examples|benchmarks|kelpie_sdk)/[\w./-]*\w)(?:::(\w+))?"
)
REPO_PATH = re.compile(
    r"`((?:docs|tests|examples|benchmarks|kelpie_sdk)/[\w./-]+?)(?:::\w+)?`"
)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (outside code blocks)."""
    found: set[str] = set()
    in_code = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            base = slug(line.lstrip("#"))
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


@pytest.mark.parametrize(
    "path", LINKED_FILES, ids=[str(p.relative_to(REPO)) for p in LINKED_FILES]
)
def test_links_resolve(path: Path) -> None:
    """Every relative link and every quoted repository path exists, anchors too."""
    text = path.read_text()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: outside the repository
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if dest in GENERATED_PAGES:
            continue
        if not dest.is_relative_to(REPO) or not dest.exists():
            broken.append(f"{target}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with the anchor #{anchor}")
    for quoted in REPO_PATH.findall(text):
        if not (REPO / quoted).exists():
            broken.append(f"`{quoted}`: no such path in the repository")
    assert not broken, f"{path.relative_to(REPO)}:\n" + "\n".join(broken)


SOURCES = [
    *LINKED_FILES,
    *(REPO / "kelpie_sdk").rglob("*.py"),
    *(REPO / "examples").rglob("*.py"),
    *(REPO / "benchmarks").rglob("*.py"),
    *(p for p in (REPO / "tests").rglob("*.py") if p != Path(__file__).resolve()),
]
DEVIATION_ID = re.compile(r"\bW-\d+\b")
DEVIATION_ROW = re.compile(r"^\| (W-\d+) \|", re.MULTILINE)


def test_ci_runs_the_readmes_test_command() -> None:
    """.ci/run ends with the README's test command, word for word."""
    readme = [
        line
        for line in (REPO / "README.md").read_text().splitlines()
        if " -m nox " in line
    ]
    ci = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert 1 == len(readme), readme
    assert readme[0] == ci[-1]


def test_no_references_outside_the_repository() -> None:
    """Docs, docstrings and comments never cite notes that are not in the repo."""
    found = []
    for path in SOURCES:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            names = [n for n in REFERENCE_NAMES if n in line]
            if "§" in line:
                names.append("§")
            if names:
                found.append(f"{path.relative_to(REPO)}:{number}: {names}")
    assert not found, "describe the behaviour in our own words:\n" + "\n".join(found)


def test_deviation_ids_are_defined() -> None:
    """Every W-n id used anywhere names a row of a deviation table in docs/."""
    defined = {
        match
        for name in ("server.md", "worker.md")
        for match in DEVIATION_ROW.findall((REPO / "docs" / name).read_text())
    }
    undefined = [
        f"{path.relative_to(REPO)}:{number}: {ident}"
        for path in SOURCES
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for ident in DEVIATION_ID.findall(line)
        if ident not in defined
    ]
    assert not undefined, (
        "ids not defined in the deviation tables of docs/server.md or docs/worker.md:\n"
        + "\n".join(undefined)
    )


def test_the_harness_reads_blocks_markers_and_prompts(tmp_path: Path) -> None:
    """The parser finds languages, markers, indented blocks and console commands."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Title\n"
        "<!-- docs-test: skip: needs a cloud -->\n"
        "```bash\n"
        "kelpie worker\n"
        "```\n"
        "\n"
        "```\n"
        "no language\n"
        "```\n"
        "- item\n"
        "  <!-- docs-test: prelude: recipe -->\n"
        "  ```python\n"
        "  print(1)\n"
        "  ```\n"
        "```console\n"
        "$ kelpie submit --command python \\\n"
        "    --arg x.py\n"
        "Queued 1 job\n"
        "$ kelpie jobs list\n"
        "```\n"
    )
    skip, bare, indented, console = find_blocks(doc)
    assert (skip.line, skip.lang, skip.marker, skip.marker_arg) == (
        3,
        "bash",
        "skip",
        "needs a cloud",
    )
    assert ("", None) == (bare.lang, bare.marker)
    assert ("python", "prelude", "recipe", "print(1)\n") == (
        indented.lang,
        indented.marker,
        indented.marker_arg,
        indented.code,
    )
    assert (
        "kelpie submit --command python \\\n    --arg x.py\nkelpie jobs list\n"
        == console_commands(console.code)
    )
