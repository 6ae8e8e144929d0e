"""Console security (SPEC §13): log-out ends the log-in on the server, every console
answer carries the security headers, and the console's log-ins are rate limited (§8)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.sessions import SecureCookieSessionInterface
from flask.testing import FlaskClient
from freezegun import freeze_time
from sqlalchemy import select

from admin.auth import COOKIE_NAME, COOKIE_PATH, ConsoleSessionInterface
from admin.models import ConsoleLogin
from app.clients.service import ClientService, hash_token
from app.db import utcnow
from app.factory import create_app
from app.runtime import Runtime, build_runtime
from tests.admin.conftest import Caller
from tests.admin.test_console import csrf_of, log_in

SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}


def cookie_of(http: FlaskClient) -> str:
    cookie = http.get_cookie(COOKIE_NAME, path=COOKIE_PATH)
    assert cookie is not None, "no console cookie"
    return cookie.value


def replay(app: Flask, cookie: str) -> FlaskClient:
    """Another browser holding a copy of the cookie."""
    other = app.test_client()
    other.set_cookie(COOKIE_NAME, cookie, path=COOKIE_PATH)
    return other


def cookie_contents(app: Flask, cookie: str) -> dict[str, Any]:
    serializer = app.session_interface.get_signing_serializer(app)  # type: ignore[attr-defined]
    return dict(serializer.loads(cookie))


def logins(runtime: Runtime) -> list[ConsoleLogin]:
    with runtime.database.read() as db:
        return list(db.execute(select(ConsoleLogin)).scalars())


# ---- the log-in lives on the server ------------------------------------------------------------
def test_log_out_ends_the_log_in_for_every_copy_of_the_cookie(app: Flask, http, admin: Caller):
    csrf = log_in(http, admin.token)
    copied = cookie_of(http)
    stolen = replay(app, copied)
    assert stolen.get("/admin/").status_code == 200
    assert stolen.get("/admin/api/stats").status_code == 200

    assert http.post("/admin/logout", data={"csrf_token": csrf}).status_code == 302
    assert http.get("/admin/").status_code == 302

    after = replay(app, copied)
    page = after.get("/admin/sessions")
    assert page.status_code == 302 and "/admin/login" in page.headers["Location"]
    assert after.get("/admin/api/stats").status_code == 401
    forced = after.post("/admin/api/clients", json={"name": "x", "role": "bot"},
                        headers={"X-CSRF-Token": csrf})
    assert forced.status_code == 401


def test_the_log_in_is_a_row_and_the_cookie_holds_neither_token_nor_its_hash(
        app: Flask, http, admin: Caller, runtime: Runtime):
    csrf = log_in(http, admin.token)
    contents = cookie_contents(app, cookie_of(http))
    assert set(contents) <= {"login", "csrf", "lang"}
    assert admin.token not in str(contents) and hash_token(admin.token) not in str(contents)
    (row,) = logins(runtime)
    assert row.login_id == hash_token(contents["login"]) != contents["login"]
    assert (row.client_id, row.ended_at) == (admin.client_id, None)
    assert row.expires_at - row.created_at == timedelta(hours=12)

    http.post("/admin/logout", data={"csrf_token": csrf})
    (row,) = logins(runtime)
    assert row.ended_at is not None


def test_a_log_in_lasts_twelve_hours_at_most(app: Flask, http, admin: Caller):
    log_in(http, admin.token)
    copied = cookie_of(http)
    with freeze_time(utcnow() + timedelta(hours=11, minutes=59)):
        assert replay(app, copied).get("/admin/").status_code == 200
    with freeze_time(utcnow() + timedelta(hours=12, seconds=1)):
        assert replay(app, copied).get("/admin/").status_code == 302
        assert replay(app, copied).get("/admin/api/stats").status_code == 401


def test_revoking_or_rotating_the_token_ends_its_log_ins(app: Flask, make_caller,
                                                         runtime: Runtime):
    clients = ClientService(runtime.database)
    rotated, revoked = make_caller("admin", "ops-rot"), make_caller("admin", "ops-rev")
    browsers = {}
    for caller in (rotated, revoked):
        browser = app.test_client()
        log_in(browser, caller.token)
        browsers[caller.client_id] = browser
    clients.rotate(rotated.client_id)
    clients.revoke(revoked.client_id)
    for browser in browsers.values():
        assert browser.get("/admin/").status_code == 302
        assert browser.get("/admin/api/stats").status_code == 401


def test_a_second_log_in_does_not_end_the_first(app: Flask, admin: Caller):
    first, second = app.test_client(), app.test_client()
    log_in(first, admin.token)
    csrf = log_in(second, admin.token)
    second.post("/admin/logout", data={"csrf_token": csrf})
    assert first.get("/admin/").status_code == 200
    assert second.get("/admin/").status_code == 302


# ---- security headers on every console answer -----------------------------------------------
@pytest.fixture
def console_urls(app: Flask, admin: Caller, open_session) -> list[tuple[str, str]]:
    """(method, URL) for every rule of the console and the admin API, with real ids."""
    session = open_session("AUTO_BARGAIN")
    upload = admin.http.post(
        "/admin/api/imports", headers=admin.headers(), content_type="text/csv",
        data=b"message_id,account_id,shop_id,sender_role,content,sent_at\n"
             b"m1,acc-1,shop-1,robot,hi,2024-01-01T00:00:00Z\n")
    values = {"session_id": session.session_id, "job_id": upload.get_json()["job_id"],
              "filename": "console.js", "code": "zh", "client_id": admin.client_id,
              "delivery_id": "dlv_x"}
    urls = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/admin"):
            continue
        path = rule.rule
        for name in rule.arguments:
            path = path.replace(f"<{name}>", str(values[name]))
            path = path.replace(f"<path:{name}>", str(values[name]))
        if rule.rule in ("/admin/slots", "/admin/api/slots"):
            path += "?account_id=acc-1&shop_id=shop-1"
        urls.extend((method, path) for method in sorted(rule.methods or ())
                    if method in ("GET", "POST"))
    assert len(urls) > 30
    return urls


def without_connect_src(policy: str) -> str:
    return ";".join(p for p in policy.split(";") if not p.strip().startswith("connect-src"))


def assert_security_headers(response: Any, where: str) -> None:
    policy = response.headers.get("Content-Security-Policy", "")
    for name, value in SECURITY_HEADERS.items():
        if name == "Content-Security-Policy":  # connect-src may name the stream's origin
            value = without_connect_src(value)
            assert without_connect_src(policy) == value, (where, policy)
            continue
        assert response.headers.get(name) == value, (where, name, response.headers)
    directives = dict((part.strip().split(" ", 1) + [""])[:2] for part in policy.split(";"))
    assert directives.get("default-src") == "'self'", (where, policy)
    assert directives.get("script-src") == "'self'", (where, policy)
    assert directives.get("style-src") == "'self'", (where, policy)
    assert directives.get("frame-ancestors") == "'none'", (where, policy)
    assert directives.get("connect-src", "").startswith("'self'"), (where, policy)
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    if "/static/" not in where:
        assert response.headers.get("Cache-Control") == "no-store", (where, response.headers)


def test_every_console_answer_sends_the_security_headers(app: Flask, http, admin: Caller,
                                                          console_urls):
    """Logged in, logged out, pages, redirects, refusals and the JSON calls alike (POSTs
    go without the CSRF token: refused, so nothing changes)."""
    anonymous = app.test_client()
    log_in(http, admin.token)
    seen: set[int] = set()
    for method, url in console_urls:
        for client in (http, anonymous):
            response = client.open(url, method=method)
            assert response.status_code < 500, (method, url, response.status_code)
            seen.add(response.status_code)
            assert_security_headers(response, f"{method} {url}")
    assert {200, 302, 401, 403} <= seen
    for url in ("/admin/sessions?status=SLEEPING", "/admin/sessions/ses_missing",
                "/admin/api/sessions/ses_missing"):
        assert_security_headers(http.get(url), url)


def test_the_static_script_and_stylesheet_stay_cacheable(http):
    for name in ("console.js", "console.css"):
        response = http.get(f"/admin/static/{name}")
        assert response.status_code == 200
        assert response.headers.get("Cache-Control") != "no-store"
        assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_the_pages_need_no_inline_script_or_style(http, admin: Caller, console_urls):
    """What the CSP forbids is absent: no inline event handlers, style attributes or
    executable inline scripts (JSON data blocks are data)."""
    log_in(http, admin.token)
    for method, url in console_urls:
        if method != "GET" or "/api/" in url or "/static/" in url:
            continue
        response = http.get(url, follow_redirects=True)
        page = response.get_data(as_text=True)
        if response.mimetype != "text/html":
            continue
        assert " style=" not in page and "<style" not in page, url
        assert " onclick=" not in page and " onload=" not in page and "javascript:" not in page
        for chunk in page.split("<script")[1:]:
            tag = chunk.split(">", 1)[0]
            assert 'type="application/json"' in tag or " src=" in tag, (url, tag)


# ---- rate limits at the console's door -------------------------------------------------------
@pytest.fixture
def limited_app(backend: Any, tmp_path: Path, runtime: Runtime) -> Iterator[Flask]:
    """The app on the test's database, with small console limits."""
    limited = build_runtime(backend.settings(
        tmp_path, rate_limit_auth_failures="3/minute", rate_limit_admin="6/minute"))
    limited._schema_checked = True
    try:
        yield create_app(limited, TESTING=True)
    finally:
        limited.close()


def test_bad_log_ins_are_limited_per_address_but_a_good_token_still_logs_in(
        limited_app: Flask, admin: Caller):
    browser = limited_app.test_client()
    csrf = csrf_of(browser.get("/admin/login").get_data(as_text=True))
    statuses = [browser.post("/admin/login", data={"token": f"ast_guess{i}", "csrf_token": csrf}
                             ).status_code for i in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    refused = browser.post("/admin/login", data={"token": "ast_guess", "csrf_token": csrf})
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert 'id="login-error"' in refused.get_data(as_text=True)
    assert_security_headers(refused, "POST /admin/login")

    good = browser.post("/admin/login", data={"token": admin.token, "csrf_token": csrf})
    assert good.status_code == 302


def test_console_requests_are_charged_to_the_admin_budget(limited_app: Flask, admin: Caller):
    browser = limited_app.test_client()
    log_in(browser, admin.token)  # its dashboard is the first of the 6 requests
    statuses = [browser.get("/admin/api/stats").status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    page = browser.get("/admin/")
    assert page.status_code == 429 and page.mimetype == "text/html"
    assert int(page.headers["Retry-After"]) >= 1
    api = browser.get("/admin/api/stats")
    assert api.status_code == 429 and api.mimetype == "application/problem+json"
    assert api.get_json()["setting"] == "RATE_LIMIT_ADMIN"


# ---- the session cookie: the shortcut for cookie-less calls answers as Flask would ------------
class _FlaskOwnSession(ConsoleSessionInterface):
    """The console's cookie attributes with Flask's own open/save (no shortcut)."""

    open_session = SecureCookieSessionInterface.open_session  # type: ignore[assignment]
    save_session = SecureCookieSessionInterface.save_session  # type: ignore[assignment]


def _cookie_script(app: Flask, admin: Caller, bot: Caller, shop: str) -> list[tuple[Any, ...]]:
    """A bot's calls, a log-in, pages, a log-out and calls after it: for each answer its
    status, its Vary header and what its Set-Cookie says (the value aside: it is signed
    with a time stamp)."""
    http = app.test_client()
    seen: list[tuple[Any, ...]] = []

    def note(response: Any) -> Any:
        cookies = [c.split(";", 1)[1] if ";" in c else "" for c in
                   response.headers.getlist("Set-Cookie")]
        emptied = [c.startswith(f"{COOKIE_NAME}=;") for c in
                   response.headers.getlist("Set-Cookie")]
        seen.append((response.status_code, response.headers.get("Vary"), cookies, emptied))
        return response

    bot_headers = {"Authorization": f"Bearer {bot.token}"}
    note(http.get("/healthz"))
    note(http.post("/api/v1/sessions", json={"account_id": "a", "shop_id": shop,
                                              "session_type": "AUTO_BARGAIN"},
                   headers=bot_headers))
    note(http.get("/admin/"))
    page = note(http.get("/admin/login"))
    csrf = csrf_of(page.get_data(as_text=True))
    note(http.post("/admin/login", data={"token": admin.token, "csrf_token": csrf}))
    csrf = csrf_of(note(http.get("/admin/")).get_data(as_text=True))
    note(http.get("/admin/api/stats"))
    note(http.get("/api/v1/sessions/nope", headers=bot_headers))
    note(http.post("/admin/logout", data={"csrf_token": csrf}))
    note(http.get("/admin/"))
    note(http.get("/healthz"))
    return seen


def test_cookie_less_calls_answer_as_flasks_own_session_would(runtime: Runtime, make_caller):
    admin, bot = make_caller("admin", "ops-cookie"), make_caller("bot", "bot-cookie")
    ours = create_app(runtime, TESTING=True)
    assert isinstance(ours.session_interface, ConsoleSessionInterface)
    flasks = create_app(runtime, TESTING=True)
    flasks.session_interface = _FlaskOwnSession()

    expected = _cookie_script(flasks, admin, bot, "shop-flask")
    got = _cookie_script(ours, admin, bot, "shop-ours")
    assert got == expected
    # and the script did exercise both kinds of answer
    assert any(cookies for _, _, cookies, _ in got) and any(not c for _, _, c, _ in got)
    assert any(any(emptied) for *_, emptied in got)  # the log-out clears the cookie
    api = got[1]
    assert api[0] == 201 and api[2] == [] and api[1] is None  # a robot's call: no cookie
