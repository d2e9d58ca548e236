"""
The web dashboard in a real headless Chromium (Debian's ``chromium``, driven
by Playwright): sign in, the jobs table, a running job's log, cancel, another
tenant's job, the groups page.

With ``UPDATE_UI_SCREENSHOTS=1`` the pages' screenshots are written to
docs/images/ (the ones docs/dashboard.md shows); otherwise to a temporary
directory.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from kelpie_sdk.client import Client
from kelpie_sdk.models import JobStatus
from kelpie_sdk.testing import ServerHandle

from .conftest import GROUP, REPO, StartWorker, wait_for

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: How long a page may take to show what a test waits for (a loaded CI machine).
WAIT_MS = 30_000

#: A job that prints a line and reports its progress every 0.1 s, for a minute (the test cancels it).
TRAINER = """
import time
from kelpie_sdk.checkpoint import report_progress
for step in range(1, 601):
    print(f"step {step} loss {1 / step:.4f}", flush=True)
    report_progress(step, 600, loss=1 / step)
    time.sleep(0.1)
"""


def _chromium() -> str:
    path = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if path is None:
        pytest.fail(
            "Chromium is not installed: the dashboard's browser tests need "
            "Debian's chromium package (apt-get install -y chromium; .ci/run "
            "installs it)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "playwright is not installed: pip install playwright (the tests "
            "dependency group has it); never 'playwright install', the tests "
            "use Debian's chromium",
            pytrace=False,
        )
    executable = _chromium()
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page_errors() -> list[str]:
    """The page's script errors and console errors."""
    return []


@pytest.fixture
def page(browser: Any, page_errors: list[str]) -> Iterator[Any]:
    """A fresh browser context (no cookies) and page."""
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors = page_errors
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: errors.append(msg.text) if msg.type == "error" else None,
    )
    yield page
    context.close()
    # A script error or a refused resource (the CSP) fails the test.
    assert [] == errors


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go."""
    if os.environ.get("UPDATE_UI_SCREENSHOTS") == "1":
        out = REPO / "docs" / "images"
        out.mkdir(parents=True, exist_ok=True)
        return out
    return tmp_path


def _sign_in(page: Any, server: ServerHandle, key: str) -> None:
    page.goto(f"{server.url}/ui")
    page.wait_for_url("**/ui/login")
    page.fill("#key", key)
    page.click("#signin")
    page.wait_for_url(f"{server.url}/ui")


def _user_key(server: ServerHandle) -> str:
    admin = {"X-Kelpie-Key": server.admin_key}
    user = requests.post(
        f"{server.url}/users",
        json={"username": f"u-{uuid.uuid4().hex[:8]}"},
        headers=admin,
        timeout=30,
    ).json()
    token = requests.post(
        f"{server.url}/users/{user['id']}/token",
        json={"org_name": "acme", "project_name": "proj"},
        headers=admin,
        timeout=30,
    ).json()
    return str(token["token"])


def test_sign_in_and_the_jobs_table(
    page: Any, server: ServerHandle, client: Client
) -> None:
    """A wrong key is refused; after sign-in the table lists the jobs, names as text, and filters."""
    page.goto(f"{server.url}/ui/login")
    page.fill("#key", "not-a-key")
    page.click("#signin")
    page.wait_for_url("**/ui/login?failed=1")
    assert page.is_visible("#failed")

    xss = "<img src=x id=pwned>"
    names = ["resnet-50", "monte-carlo", xss]
    ids = [
        client.submit_job(
            command="python",
            container_group_id=GROUP if n != 1 else "sims",
            sync={},
            name=name,
            tags=["nightly"] if n == 0 else (),
        ).id
        for n, name in enumerate(names)
    ]
    _sign_in(page, server, server.admin_key)
    rows = page.locator("#jobs tbody tr")
    rows.first.wait_for()
    wait_for(lambda: rows.count() == 3, timeout=WAIT_MS / 1000)
    assert set(ids) == {
        rows.nth(i).get_attribute("data-job-id") for i in range(rows.count())
    }
    assert page.get_by_text(xss, exact=True).is_visible()
    assert 0 == page.locator("#pwned").count()

    page.fill("#f-tag", "nightly")
    wait_for(lambda: rows.count() == 1, timeout=WAIT_MS / 1000)
    assert ids[0] == rows.first.get_attribute("data-job-id")
    page.fill("#f-tag", "")
    page.select_option("#f-status", "running")
    wait_for(lambda: rows.count() == 0, timeout=WAIT_MS / 1000)

    # The table updates by itself: a job submitted now appears.
    page.select_option("#f-status", "")
    late = client.submit_job(command="python", container_group_id=GROUP, sync={})
    page.locator(f"#jobs tbody tr[data-job-id='{late.id}']").wait_for()


def test_a_running_jobs_log_and_cancel(
    page: Any,
    server: ServerHandle,
    client: Client,
    start_worker: StartWorker,
    shots: Path,
    tmp_path: Path,
) -> None:
    """The job page shows the log lines as they are printed, its progress, and cancels it."""
    start_worker(storage_url=f"file://{tmp_path}")
    done = client.submit_job(
        command=sys.executable,
        arguments=["-c", "print('warm-up done')"],
        container_group_id=GROUP,
        sync={},
        name="warm-up",
    )
    client.wait(done.id, timeout=60, poll_interval=0.2)
    job = client.submit_job(
        command=sys.executable,
        arguments=["-c", TRAINER],
        container_group_id=GROUP,
        sync={},
        heartbeat_interval=1,
        name="train-resnet",
        tags=["nightly"],
    )
    wait_for(lambda: client.get_job(job.id).status == JobStatus.RUNNING)
    _sign_in(page, server, server.admin_key)
    page.locator(f"#jobs tbody tr[data-job-id='{job.id}'] .status-running").wait_for()
    page.screenshot(path=str(shots / "ui-jobs.png"), full_page=True)
    page.goto(f"{server.url}/ui/jobs/{job.id}")
    page.locator("#job-status", has_text="running").wait_for()
    # Lines printed after the page opened arrive through the follow.
    first = page.locator("#log span").count()
    page.locator("#log span", has_text="step ").nth(first + 3).wait_for()
    page.locator("#timeline .attempt").first.wait_for()
    page.locator("#log span", has_text="step 40 ").wait_for()
    page.locator("#progress-text", has_text="step ").wait_for()
    page.screenshot(path=str(shots / "ui-job.png"), full_page=True)

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#cancel")
    page.locator("#job-status", has_text="canceled").wait_for()
    assert JobStatus.CANCELED == client.get_job(job.id).status
    page.locator("#events tbody tr td", has_text="canceled").first.wait_for()
    assert page.locator("#cancel").is_hidden()

    page.goto(f"{server.url}/ui/groups")
    row = page.locator("#groups tbody tr", has_text=GROUP)
    row.wait_for()
    assert "1" == row.locator("td.completed").inner_text()
    assert "1" == row.locator("td.canceled").inner_text()
    page.screenshot(path=str(shots / "ui-groups.png"), full_page=True)


def test_another_tenants_job_is_not_found(
    page: Any, server: ServerHandle, client: Client, page_errors: list[str]
) -> None:
    """A user who opens another user's job page sees 'Not found', and not the job in the table."""
    theirs = client.submit_job(
        command="python", container_group_id=GROUP, sync={}, name="admins-job"
    )
    key = _user_key(server)
    with Client(server.url, key) as own_client:
        mine = own_client.submit_job(
            command="python", container_group_id=GROUP, sync={}, name="my-job"
        )
    _sign_in(page, server, key)
    page.locator(f"#jobs tbody tr[data-job-id='{mine.id}']").wait_for()
    assert 1 == page.locator("#jobs tbody tr").count()

    response = page.goto(f"{server.url}/ui/jobs/{theirs.id}")
    assert 404 == response.status
    assert "Not found" == page.locator("h1").inner_text()
    assert "admins-job" not in page.content()
    # The browser notes the page's own 404 on its console; nothing else.
    assert ["404 (Not Found)"] == [e[-15:] for e in page_errors]
    page_errors.clear()

    # Sign out: the pages send the browser back to the form.
    page.goto(f"{server.url}/ui")
    page.click("#logout")
    page.wait_for_url("**/ui/login")
    # A refresh in flight while the session ended may be answered 401.
    page_errors[:] = [e for e in page_errors if not e.endswith("401 (Unauthorized)")]
    page.goto(f"{server.url}/ui")
    page.wait_for_url("**/ui/login")


def test_sign_out_works_before_the_session_has_answered(
    page: Any, server: ServerHandle, client: Client
) -> None:
    """A click on "Sign out" while the page still waits for its session signs out.

    The button used to get its handler only once ``/ui/session`` had
    answered; on a loaded machine a click that came first did nothing.
    """
    _sign_in(page, server, server.admin_key)
    held: list[Any] = []
    page.route("**/ui/session", lambda route: held.append(route))
    page.goto(f"{server.url}/ui")
    # Playwright calls the route handler while the test waits in a Playwright call.
    for _ in range(600):
        if held:
            break
        page.wait_for_timeout(50)
    assert held, "the page never asked for its session"
    page.click("#logout")
    # Only now does the session answer.
    held[0].continue_()
    page.unroute("**/ui/session")
    page.wait_for_url("**/ui/login")
    # The session really ended: the pages send the browser back to the form.
    page.goto(f"{server.url}/ui")
    page.wait_for_url("**/ui/login")


def test_without_chromium_the_tests_fail_and_say_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A machine without chromium fails these tests with what to install; it does not skip them."""
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
        _chromium()
