"""
Idempotent submission: ``Idempotency-Key`` on ``POST /jobs`` and ``POST /jobs/batch``.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import pathlib
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import sqlalchemy as sa

from kelpie_sdk.models import JobSubmission, SyncSpec
from kelpie_sdk.server import open_store
from kelpie_sdk.server._db import IDEMPOTENCY_KEYS, JOBS
from kelpie_sdk.server._store import (
    IDEMPOTENCY_KEY_SECONDS,
    IdempotencyConflict,
    Store,
)
from kelpie_sdk.testing import run_server

from ..conftest import Api, FakeClock
from ..pg import fresh_database
from .helpers import sync_job

#: The three servers' admin key (32+ characters, as the server wants).
ADMIN_KEY = "admin-" + "a" * 32


def _count(api: Api, group: str) -> int:
    listed = api.get(
        "/jobs", params={"container_group_id": group, "page_size": 1000}
    ).json()
    return int(listed["_count"])


# -- over HTTP, on SQLite and PostgreSQL ---------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [("/jobs", "one"), ("/jobs/batch", "three")],
    ids=["single", "batch"],
)
def test_a_repeat_replays_the_first_answer_and_queues_nothing(
    api: Api, container_group_id: str, path: str, body: str
) -> None:
    """The same key and body again: the same 202 and body, marked replayed."""
    sent: Any = (
        sync_job(container_group_id)
        if body == "one"
        else [sync_job(container_group_id, name=f"n{i}") for i in range(3)]
    )
    headers = {"Idempotency-Key": "submit-1"}
    first = api.post(path, json=sent, headers=headers)
    again = api.post(path, json=sent, headers=headers)
    assert (202, 202) == (first.status_code, again.status_code)
    assert first.content == again.content
    assert "true" == again.headers.get("Idempotent-Replayed")
    assert "Idempotent-Replayed" not in first.headers
    assert (1 if body == "one" else 3) == _count(api, container_group_id)


def test_the_body_is_compared_as_json(api: Api, container_group_id: str) -> None:
    """Key order and spacing of the JSON do not make a repeat a new request."""
    headers = {"Idempotency-Key": "k", "Content-Type": "application/json"}
    job = sync_job(container_group_id, name="x")
    first = api.post("/jobs", data=json.dumps(job), headers=headers)
    reordered = json.dumps(dict(reversed(job.items())), indent=2)
    again = api.post("/jobs", data=reordered, headers=headers)
    assert first.json() == again.json()
    assert "true" == again.headers.get("Idempotent-Replayed")
    assert 1 == _count(api, container_group_id)


@pytest.mark.parametrize(
    ("path", "other"),
    [("/jobs", {"command": "other"}), ("/jobs/batch", None)],
    ids=["other-body", "other-endpoint"],
)
def test_the_same_key_for_another_request_is_409(
    api: Api, container_group_id: str, path: str, other: dict[str, Any] | None
) -> None:
    """A key reused with another body or endpoint is refused and queues nothing."""
    headers = {"Idempotency-Key": "reused"}
    job = sync_job(container_group_id)
    assert 202 == api.post("/jobs", json=job, headers=headers).status_code
    second = {**job, **other} if other is not None else [job]
    r = api.post(path, json=second, headers=headers)
    assert 409 == r.status_code
    assert "Conflict" == r.json()["error"]
    assert (
        "Idempotency-Key 'reused' was already used for a different request"
        in (r.json()["message"])
    )
    assert 1 == _count(api, container_group_id)


def test_keys_are_per_tenant(
    api: Api, admin_api: Api, api_server: Any, container_group_id: str
) -> None:
    """Another tenant's identical key and body queues that tenant's own job."""
    headers = {"Idempotency-Key": "shared"}
    mine = api.post("/jobs", json=sync_job(container_group_id), headers=headers)
    user = admin_api.post("/users", json={"username": f"u-{uuid.uuid4().hex}"}).json()
    token = admin_api.post(
        f"/users/{user['id']}/token", json={"org_name": "o", "project_name": "p"}
    ).json()["token"]
    other = Api(api_server.url, token)
    theirs = other.post("/jobs", json=sync_job(container_group_id), headers=headers)
    assert (202, 202) == (mine.status_code, theirs.status_code)
    assert mine.json()["id"] != theirs.json()["id"]
    assert "Idempotent-Replayed" not in theirs.headers
    assert 1 == _count(other, container_group_id)


@pytest.mark.parametrize(
    "key", ["", "x" * 256, "caf\xe9", "a\tb"], ids=["empty", "256", "latin1", "tab"]
)
def test_a_malformed_key_is_400(api: Api, container_group_id: str, key: str) -> None:
    """Keys are 1 to 255 printable ASCII characters; others queue nothing."""
    r = api.post(
        "/jobs", json=sync_job(container_group_id), headers={"Idempotency-Key": key}
    )
    assert 400 == r.status_code
    assert (
        "Idempotency-Key must be 1 to 255 printable ASCII characters"
        == (r.json()["message"])
    )
    assert 0 == _count(api, container_group_id)


def test_the_longest_key_is_accepted(api: Api, container_group_id: str) -> None:
    """A key of 255 characters (spaces and punctuation too) is fine."""
    key = ("a b~!" * 51)[:255]
    r = api.post(
        "/jobs", json=sync_job(container_group_id), headers={"Idempotency-Key": key}
    )
    assert 202 == r.status_code


def test_two_key_headers_are_400(
    api_server: Any, user_key: str, container_group_id: str
) -> None:
    """A request with two Idempotency-Key headers is ambiguous and refused."""
    parts = urlsplit(api_server.url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    body = json.dumps(sync_job(container_group_id)).encode()
    conn.putrequest("POST", "/jobs")
    for name, value in [
        ("X-Kelpie-Key", user_key),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Idempotency-Key", "a"),
        ("Idempotency-Key", "b"),
    ]:
        conn.putheader(name, value)
    conn.endheaders(body)
    r = conn.getresponse()
    assert 400 == r.status
    assert "send one Idempotency-Key header" in json.loads(r.read())["message"]
    conn.close()


def test_a_rejected_submission_does_not_keep_its_key(
    api: Api, container_group_id: str
) -> None:
    """After a 400, the same key queues the corrected job (no 409)."""
    headers = {"Idempotency-Key": "fix-and-retry"}
    bad = api.post("/jobs", json={"command": "x", "sync": {}}, headers=headers)
    assert 400 == bad.status_code
    good = api.post("/jobs", json=sync_job(container_group_id), headers=headers)
    assert 202 == good.status_code
    assert "Idempotent-Replayed" not in good.headers


def test_submissions_without_a_key_are_unchanged(
    api: Api, container_group_id: str
) -> None:
    """Without the header, the same body twice queues two jobs."""
    for _ in range(2):
        assert 202 == api.post("/jobs", json=sync_job(container_group_id)).status_code
    assert 2 == _count(api, container_group_id)


# -- concurrent repeats on several replicas -------------------------------------


@contextlib.contextmanager
def _database(kind: str, tmp_path: pathlib.Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path}/k.db"
    else:
        with fresh_database() as url:
            yield url


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_concurrent_repeats_on_three_replicas_queue_once(
    kind: str, tmp_path: pathlib.Path
) -> None:
    """12 threads post one key to 3 servers on one database at once: one batch."""
    threads = 12
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(_database(kind, tmp_path))
        servers = [
            stack.enter_context(run_server(database_url=url, admin_key=ADMIN_KEY))
            for _ in range(3)
        ]
        body = [sync_job("g", name=f"n{i}") for i in range(50)]
        gate = threading.Barrier(threads)
        answers: list[requests.Response] = []
        lock = threading.Lock()

        def post(n: int) -> None:
            with requests.Session() as session:
                gate.wait()
                r = session.post(
                    servers[n % 3].url + "/jobs/batch",
                    json=body,
                    headers={"X-Kelpie-Key": ADMIN_KEY, "Idempotency-Key": "same"},
                    timeout=60,
                )
            with lock:
                answers.append(r)

        workers = [threading.Thread(target=post, args=(n,)) for n in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=90)
        assert [202] * threads == [r.status_code for r in answers]
        assert 1 == len({r.content for r in answers})
        assert 1 == sum("Idempotent-Replayed" not in r.headers for r in answers)
        with servers[0].store.engine.connect() as conn:
            assert (
                50
                == conn.execute(sa.select(sa.func.count()).select_from(JOBS)).scalar()
            )


# -- the store ------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def clocked_store(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> Iterator[tuple[Store, FakeClock]]:
    """A store of its own with a fake clock, on SQLite and on PostgreSQL."""
    clock = FakeClock()
    with _database(request.param, tmp_path) as url:
        store = open_store(url, clock=clock)
        try:
            yield store, clock
        finally:
            store.close()


_SUB = JobSubmission(command="c", container_group_id="g", sync=SyncSpec())


def _once(store: Store, key: str, fingerprint: str = "f", n: int = 1) -> Any:
    return store.insert_jobs_once(
        "u",
        [_SUB] * n,
        key=key,
        fingerprint=fingerprint,
        status=202,
        render=lambda jobs: json.dumps([j.id for j in jobs]),
    )


def _rows(store: Store, table: sa.Table) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar())


def test_store_threads_racing_on_one_key_insert_once(
    clocked_store: tuple[Store, FakeClock],
) -> None:
    """16 threads call insert_jobs_once with one key at once: one set of jobs."""
    store, _ = clocked_store
    gate = threading.Barrier(16)
    answers = []
    lock = threading.Lock()

    def submit() -> None:
        gate.wait()
        answer = _once(store, "race", n=20)
        with lock:
            answers.append(answer)

    workers = [threading.Thread(target=submit) for _ in range(16)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert 16 == len(answers)
    assert 1 == len({a.body for a in answers})
    assert 1 == sum(not a.replayed for a in answers)
    assert 20 == _rows(store, JOBS)


def test_store_conflict_on_another_fingerprint(
    clocked_store: tuple[Store, FakeClock],
) -> None:
    """The same key with another fingerprint raises IdempotencyConflict."""
    store, _ = clocked_store
    _once(store, "k", "one")
    with pytest.raises(IdempotencyConflict):
        _once(store, "k", "two")
    assert 1 == _rows(store, JOBS)


def _fail_inserts(store: Store, on: bool) -> None:
    """A real database failure: a trigger that aborts the insert of jobs."""
    with store.engine.begin() as conn:
        if store.engine.dialect.name == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER boom BEFORE INSERT ON jobs "
                "BEGIN SELECT RAISE(ABORT, 'boom'); END"
                if on
                else "DROP TRIGGER boom"
            )
        elif on:
            conn.exec_driver_sql(
                "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'boom'; END $$"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER boom BEFORE INSERT ON jobs "
                "FOR EACH ROW EXECUTE FUNCTION boom()"
            )
        else:
            conn.exec_driver_sql("DROP TRIGGER boom ON jobs")


def test_store_a_failed_first_attempt_does_not_keep_the_key(
    clocked_store: tuple[Store, FakeClock],
) -> None:
    """The jobs' insert fails: the key is rolled back, and a repeat queues them."""
    store, _ = clocked_store
    _fail_inserts(store, True)
    with pytest.raises(sa.exc.DBAPIError, match="boom"):
        _once(store, "k", n=2)
    _fail_inserts(store, False)
    assert 0 == _rows(store, IDEMPOTENCY_KEYS)
    answer = _once(store, "k", n=2)
    assert not answer.replayed
    assert 2 == _rows(store, JOBS)


def test_store_keys_expire_after_a_day(
    clocked_store: tuple[Store, FakeClock],
) -> None:
    """A key is replayed for 24 h; then the same key queues again."""
    store, clock = clocked_store
    first = _once(store, "k")
    clock.advance(IDEMPOTENCY_KEY_SECONDS - 1)
    assert _once(store, "k").replayed
    clock.advance(1)
    again = _once(store, "k")
    assert not again.replayed
    assert first.body != again.body
    assert 2 == _rows(store, JOBS)


def test_store_keyed_submissions_sweep_expired_keys(
    clocked_store: tuple[Store, FakeClock],
) -> None:
    """Each keyed submission deletes up to 100 expired keys of any tenant."""
    store, clock = clocked_store
    for n in range(150):
        _once(store, f"old-{n}")
    clock.advance(IDEMPOTENCY_KEY_SECONDS)
    _once(store, "new-1")
    assert 150 + 1 - 100 == _rows(store, IDEMPOTENCY_KEYS)
    _once(store, "new-2")
    assert 2 == _rows(store, IDEMPOTENCY_KEYS)


def test_deleting_all_jobs_forgets_the_keys(
    clocked_store: tuple[Store, FakeClock],
) -> None:
    """The admin's wipe of all jobs also drops the keys that named them."""
    store, _ = clocked_store
    _once(store, "k")
    store.delete_all_jobs()
    assert not _once(store, "k").replayed


def test_the_sdk_repeats_with_its_own_key_and_gets_a_conflict_for_other_jobs(
    client: Any, container_group_id: str
) -> None:
    """idempotency_key= repeated: the same job back; with another job, ConflictError."""
    from kelpie_sdk.errors import ConflictError

    def submit(command: str) -> Any:
        return client.submit_job(
            command=command,
            container_group_id=container_group_id,
            sync={},
            idempotency_key="nightly",
        )

    assert submit("a").id == submit("a").id
    with pytest.raises(ConflictError, match="already used for a different request"):
        submit("b")
    assert 1 == len(list(client.list_jobs(container_group_id=container_group_id)))


# -- the SDK against the real server, through a proxy that loses an answer -----


class _LosingProxy(http.server.ThreadingHTTPServer):
    """
    Forwards requests to the API server; for the first ``POST /jobs/batch`` it
    waits for the server's whole answer (the jobs are committed by then) and
    then cuts the client's connection instead of relaying it.
    """

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream
        #: Called after the answer to lose arrived, before the cut.
        self.on_lost: Callable[[], None] | None = None
        self.lost: list[requests.Response] = []
        self.keys: list[str] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: _LosingProxy
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        skip = {"host", "content-length", "connection"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        answer = requests.request(
            self.command,
            self.server.upstream + self.path,
            data=body,
            headers=headers,
            timeout=60,
        )
        with self.server.lock:
            batch = self.command == "POST" and self.path == "/jobs/batch"
            if batch:
                self.server.keys.append(self.headers.get("Idempotency-Key", ""))
            lose = batch and not self.server.lost
            if lose:
                self.server.lost.append(answer)
        if lose:
            if self.server.on_lost is not None:
                self.server.on_lost()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(answer.status_code)
        for name in ("Content-Type", "Idempotent-Replayed"):
            if name in answer.headers:
                self.send_header(name, answer.headers[name])
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    do_GET = do_POST = _handle


@pytest.fixture
def losing_proxy(api_server: Any) -> Iterator[_LosingProxy]:
    """A proxy on 127.0.0.1 in front of the session's API server."""
    proxy = _LosingProxy(api_server.url)
    thread = threading.Thread(
        target=proxy.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(5)


def test_the_sdk_retry_of_a_lost_1000_job_answer_queues_nothing_twice(
    losing_proxy: _LosingProxy, api: Api, user_key: str, container_group_id: str
) -> None:
    """The first answer to a 1,000-job batch is lost after commit; the retry replays it."""
    from kelpie_sdk import Client

    sleeps: list[float] = []
    with Client(losing_proxy.url, user_key, environ={}, sleep=sleeps.append) as client:
        jobs = client.submit_jobs(
            [sync_job(container_group_id, name=f"n{i}") for i in range(1000)]
        )
    [lost] = losing_proxy.lost
    assert 202 == lost.status_code
    assert [j["id"] for j in lost.json()] == [j.id for j in jobs]
    assert 2 == len(losing_proxy.keys)
    assert 1 == len(set(losing_proxy.keys))
    assert 1 == len(sleeps)
    assert 1000 == _count(api, container_group_id)


@pytest.mark.slow
def test_a_server_killed_after_commit_leaves_the_answer_to_its_successor(
    tmp_path: pathlib.Path,
) -> None:
    """The server is SIGKILLed after committing a batch; the retry, served by a
    new server process on the same database, replays it."""
    from kelpie_sdk import Client

    from .test_replica_kill import KEY, _server_process

    url = f"sqlite:///{tmp_path}/k.db"
    with contextlib.ExitStack() as stack:
        base, first = stack.enter_context(_server_process(url))
        proxy = _LosingProxy(base)

        def crash_and_restart() -> None:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            proxy.upstream = stack.enter_context(_server_process(url))[0]

        proxy.on_lost = crash_and_restart
        thread = threading.Thread(
            target=proxy.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        thread.start()
        stack.callback(thread.join, 5)
        stack.callback(proxy.server_close)
        stack.callback(proxy.shutdown)
        with Client(proxy.url, KEY, environ={}, sleep=lambda _: None) as client:
            jobs = client.submit_jobs(
                [sync_job("g", name=f"n{i}") for i in range(1000)]
            )
        assert first.returncode == -signal.SIGKILL
        [lost] = proxy.lost
        assert [j["id"] for j in lost.json()] == [j.id for j in jobs]
        assert 1000 == _count(Api(proxy.upstream, KEY), "g")
