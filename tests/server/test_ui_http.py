"""
The web dashboard's sign-in, cookie, CSRF and tenant rules, over plain HTTP
(the browser tests are in tests/e2e/test_ui_browser.py).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import requests

from kelpie_sdk.server import create_app
from kelpie_sdk.testing import run_server

from .helpers import sync_job


def _req(method: str, url: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, url, timeout=30, **kwargs)


def _signed_in(url: str, key: str) -> tuple[requests.Session, str]:
    """A session signed in with ``key`` and its CSRF token."""
    s = requests.Session()
    r = s.post(f"{url}/ui/login", data={"key": key}, allow_redirects=False)
    assert (303, "/ui") == (r.status_code, r.headers["location"])
    return s, s.get(f"{url}/ui/session").json()["csrf"]


def _submit(url: str, key: str, group: str, **extra: Any) -> str:
    r = _req(
        "POST",
        f"{url}/jobs",
        json=sync_job(group, **extra),
        headers={"X-Kelpie-Key": key},
    )
    assert 202 == r.status_code, r.text
    return str(r.json()["id"])


def test_pages_redirect_to_sign_in_without_a_session(api_server: Any) -> None:
    """/ui, /ui/groups and a job page send a stranger to /ui/login."""
    for path in ("/ui", "/ui/groups", f"/ui/jobs/{uuid.uuid4()}"):
        r = _req("GET", f"{api_server.url}{path}", allow_redirects=False)
        assert (303, "/ui/login") == (r.status_code, r.headers["location"])
    r = _req("GET", f"{api_server.url}/ui/session")
    assert 401 == r.status_code


def test_sign_in_sets_an_httponly_samesite_strict_cookie(
    api_server: Any, user_key: str
) -> None:
    """The cookie holds an opaque id (not the key), HttpOnly, SameSite=Strict, not Secure over http."""
    r = _req(
        "POST",
        f"{api_server.url}/ui/login",
        data={"key": user_key},
        allow_redirects=False,
    )
    assert 303 == r.status_code
    cookie = r.headers["set-cookie"]
    attrs = [a.strip().lower() for a in cookie.split(";")]
    assert "httponly" in attrs
    assert "samesite=strict" in attrs
    assert "secure" not in attrs
    assert user_key not in cookie
    assert "path=/" in attrs


def test_a_wrong_key_is_refused(api_server: Any) -> None:
    """A wrong key sets no cookie and goes back to the form with a flag."""
    r = _req(
        "POST",
        f"{api_server.url}/ui/login",
        data={"key": "nope"},
        allow_redirects=False,
    )
    assert (303, "/ui/login?failed=1") == (r.status_code, r.headers["location"])
    assert "set-cookie" not in r.headers


def test_sign_in_from_another_site_is_refused(api_server: Any, user_key: str) -> None:
    """A form posted from another origin gets 403 and no session."""
    r = _req(
        "POST",
        f"{api_server.url}/ui/login",
        data={"key": user_key},
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
    )
    assert 403 == r.status_code
    assert "set-cookie" not in r.headers


def test_cancel_with_the_cookie_needs_the_csrf_token(
    api_server: Any, user_key: str, container_group_id: str
) -> None:
    """DELETE /jobs/{id} by cookie: refused without or with a wrong token, done with the right one."""
    job_id = _submit(api_server.url, user_key, container_group_id)
    s, csrf = _signed_in(api_server.url, user_key)
    url = f"{api_server.url}/jobs/{job_id}"
    for headers in ({}, {"X-CSRF-Token": "wrong"}):
        r = s.delete(url, headers=headers)
        assert 403 == r.status_code
        assert "X-CSRF-Token" in r.json()["message"]
    assert "pending" == s.get(url).json()["status"]
    assert 202 == s.delete(url, headers={"X-CSRF-Token": csrf}).status_code
    assert "canceled" == s.get(url).json()["status"]


def test_another_sessions_token_does_not_count(
    api_server: Any, user_key: str, container_group_id: str
) -> None:
    """The token is bound to its session: a second sign-in's token is refused."""
    job_id = _submit(api_server.url, user_key, container_group_id)
    s, _ = _signed_in(api_server.url, user_key)
    _, other = _signed_in(api_server.url, user_key)
    r = s.delete(f"{api_server.url}/jobs/{job_id}", headers={"X-CSRF-Token": other})
    assert 403 == r.status_code


def test_api_keys_need_no_csrf_token(
    api_server: Any, user_key: str, container_group_id: str
) -> None:
    """X-Kelpie-Key callers are unchanged."""
    job_id = _submit(api_server.url, user_key, container_group_id)
    r = _req(
        "DELETE", f"{api_server.url}/jobs/{job_id}", headers={"X-Kelpie-Key": user_key}
    )
    assert 202 == r.status_code


def test_another_tenants_job_is_not_found(
    api_server: Any, admin_api: Any, user_key: str, container_group_id: str
) -> None:
    """A job page, the job's JSON and its cancel answer 404 to another user."""
    owner = admin_api.post("/users", json={"username": f"o-{uuid.uuid4().hex}"})
    owner_key = admin_api.post(
        f"/users/{owner.json()['id']}/token",
        json={"org_name": "acme", "project_name": "proj"},
    ).json()["token"]
    job_id = _submit(api_server.url, owner_key, container_group_id)
    s, csrf = _signed_in(api_server.url, user_key)
    page = s.get(f"{api_server.url}/ui/jobs/{job_id}")
    assert 404 == page.status_code
    assert "Not found" in page.text
    assert 404 == s.get(f"{api_server.url}/jobs/{job_id}").status_code
    r = s.delete(f"{api_server.url}/jobs/{job_id}", headers={"X-CSRF-Token": csrf})
    assert 404 == r.status_code
    own, _ = _signed_in(api_server.url, owner_key)
    assert 200 == own.get(f"{api_server.url}/ui/jobs/{job_id}").status_code


def test_group_counts_are_per_tenant(
    api_server: Any, api: Any, user_key: str, container_group_id: str
) -> None:
    """GET /ui/api/groups counts the caller's jobs per status per group, in one query."""
    other_group = f"{container_group_id}-b"
    ids = [_submit(api_server.url, user_key, container_group_id) for _ in range(3)]
    _submit(api_server.url, user_key, other_group)
    assert 202 == api.delete(f"/jobs/{ids[0]}").status_code
    s, _ = _signed_in(api_server.url, user_key)
    groups = s.get(f"{api_server.url}/ui/api/groups").json()["groups"]
    assert [
        {
            "container_group_id": container_group_id,
            "pending": 2,
            "running": 0,
            "completed": 0,
            "failed": 0,
            "canceled": 1,
        },
        {
            "container_group_id": other_group,
            "pending": 1,
            "running": 0,
            "completed": 0,
            "failed": 0,
            "canceled": 0,
        },
    ] == groups


def test_sign_out_ends_the_session(api_server: Any, user_key: str) -> None:
    """POST /ui/logout needs the token, then the cookie no longer authenticates."""
    s, csrf = _signed_in(api_server.url, user_key)
    assert 403 == s.post(f"{api_server.url}/ui/logout").status_code
    assert 200 == s.get(f"{api_server.url}/jobs").status_code
    r = s.post(
        f"{api_server.url}/ui/logout",
        headers={"X-CSRF-Token": csrf},
        allow_redirects=False,
    )
    assert (303, "/ui/login") == (r.status_code, r.headers["location"])
    assert (
        401
        == _req(
            "GET", f"{api_server.url}/jobs", cookies={"kelpie_session": "x"}
        ).status_code
    )
    assert 401 == s.get(f"{api_server.url}/ui/session").status_code


def test_pages_carry_a_strict_content_security_policy(
    api_server: Any, user_key: str
) -> None:
    """No inline scripts: scripts only from this server; the page loads app.js."""
    s, _ = _signed_in(api_server.url, user_key)
    for path in ("/ui", "/ui/groups", "/ui/login", "/ui/static/app.js"):
        r = s.get(f"{api_server.url}{path}")
        assert 200 == r.status_code, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert "nosniff" == r.headers["x-content-type-options"]
    page = s.get(f"{api_server.url}/ui").text
    assert '<script src="/ui/static/app.js" defer></script>' in page
    assert "<script>" not in page


@pytest.mark.parametrize("name", ["../_ui.py", "app.py", ".hidden.js", "nope.js"])
def test_static_serves_only_the_pages_assets(api_server: Any, name: str) -> None:
    """Only .js/.css files of the ui folder are served."""
    r = _req("GET", f"{api_server.url}/ui/static/{name}")
    assert 404 == r.status_code


def test_secure_cookie_when_configured() -> None:
    """create_app(secure_cookie=True) marks the cookie Secure even over http."""
    with run_server() as server:
        store = server.store
        app = create_app(store, secure_cookie=True)
        assert app.state.kelpie.ui.secure_cookie is True

        from litestar.testing import TestClient

        with TestClient(app, base_url="http://testserver.local") as tc:
            r = tc.post(
                "/ui/login",
                data={"key": server.admin_key},
                follow_redirects=False,
            )
        attrs = [a.strip().lower() for a in r.headers["set-cookie"].split(";")]
        assert "secure" in attrs


def test_secure_cookie_by_default_over_https() -> None:
    """By default the cookie is Secure when the request came over https."""
    from litestar.testing import TestClient

    with run_server() as server:
        app = create_app(server.store)
        with TestClient(app, base_url="https://testserver.local") as tc:
            r = tc.post(
                "/ui/login", data={"key": server.admin_key}, follow_redirects=False
            )
        attrs = [a.strip().lower() for a in r.headers["set-cookie"].split(";")]
        assert "secure" in attrs


def test_assets_have_one_charset(api_server: Any, user_key: str) -> None:
    """Pages, script and style sheet are served as UTF-8 text of the right type."""
    s, _ = _signed_in(api_server.url, user_key)
    for path, kind in [
        ("/ui", "text/html"),
        ("/ui/static/app.js", "text/javascript"),
        ("/ui/static/style.css", "text/css"),
    ]:
        r = s.get(f"{api_server.url}{path}")
        assert f"{kind}; charset=utf-8" == r.headers["content-type"], path


def test_deleting_users_ends_their_sessions() -> None:
    """After DELETE /users a signed-in user's cookie no longer works; pages go back to sign-in."""
    with run_server() as server:
        admin = {"X-Kelpie-Key": server.admin_key}
        user = _req(
            "POST", f"{server.url}/users", json={"username": "dora"}, headers=admin
        ).json()
        key = _req(
            "POST",
            f"{server.url}/users/{user['id']}/token",
            json={"org_name": "o", "project_name": "p"},
            headers=admin,
        ).json()["token"]
        s, _ = _signed_in(server.url, key)
        assert 200 == s.get(f"{server.url}/jobs").status_code
        assert 204 == _req("DELETE", f"{server.url}/users", headers=admin).status_code
        assert 403 == s.get(f"{server.url}/jobs").status_code
        r = s.get(f"{server.url}/ui", allow_redirects=False)
        assert (303, "/ui/login") == (r.status_code, r.headers["location"])
