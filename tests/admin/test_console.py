"""The console's log-in, cookie, CSRF, pages and languages (Flask test client; the
browser tests drive the same pages in Chromium)."""

from __future__ import annotations

import re

from flask.testing import FlaskClient
from sqlalchemy import select

from app.audit.models import Operation
from app.runtime import Runtime
from tests.admin.conftest import Caller


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert match, "the page carries no CSRF token"
    return match.group(1)


def log_in(http: FlaskClient, token: str, *, expect: int = 302) -> str:
    csrf = csrf_of(http.get("/admin/login").get_data(as_text=True))
    response = http.post("/admin/login", data={"token": token, "csrf_token": csrf})
    assert response.status_code == expect, response.get_data(as_text=True)[:500]
    return csrf_of(http.get("/admin/").get_data(as_text=True)) if expect == 302 else csrf


def test_pages_need_a_log_in_and_only_admin_tokens_get_one(http, make_caller, admin: Caller):
    assert http.get("/admin/").status_code == 302
    assert "/admin/login" in http.get("/admin/sessions").headers["Location"]
    bot = make_caller("bot")
    log_in(http, bot.token, expect=401)
    log_in(http, "ast_not-a-token", expect=401)
    assert http.get("/admin/").status_code == 302

    csrf = csrf_of(http.get("/admin/login").get_data(as_text=True))
    forged = http.post("/admin/login", data={"token": admin.token, "csrf_token": "forged"})
    assert forged.status_code == 403
    assert http.post("/admin/login", data={"token": admin.token, "csrf_token": csrf}
                     ).status_code == 302
    dashboard = http.get("/admin/")
    assert dashboard.status_code == 200
    assert "ops-alice" in dashboard.get_data(as_text=True)


def test_the_cookie_is_http_only_scoped_and_secure_off_loopback(app, admin: Caller):
    for base, secure in (("http://127.0.0.1", False), ("https://ops.example.com", True),
                         ("http://ops.example.com", True)):
        http = app.test_client()
        page = http.get("/admin/login", base_url=base)
        cookie = page.headers["Set-Cookie"]
        assert cookie.startswith("as_admin=")
        assert "HttpOnly" in cookie and "Path=/admin" in cookie and "SameSite=Lax" in cookie
        assert ("Secure" in cookie) is secure, (base, cookie)
        assert admin.token not in cookie


def test_console_api_calls_need_the_csrf_header_on_writes(http, admin: Caller, open_session,
                                                         runtime: Runtime):
    session = open_session("AUTO_BARGAIN")
    csrf = log_in(http, admin.token)
    assert http.get("/admin/api/stats").status_code == 200  # reads: the cookie is enough
    path = f"/admin/api/sessions/{session.session_id}/force-close"
    assert http.post(path, json={}).status_code == 403
    assert http.post(path, json={}, headers={"X-CSRF-Token": "wrong"}).status_code == 403
    assert runtime.sessions.get(session.session_id).status == "ACTIVE"
    done = http.post(path, json={"reason": "from the console"}, headers={"X-CSRF-Token": csrf})
    assert done.status_code == 200
    with runtime.database.read() as db:
        last = db.execute(select(Operation).where(Operation.session_id == session.session_id)
                          .order_by(Operation.id.desc()).limit(1)).scalar_one()
    assert (last.operation, last.actor) == ("force-close", admin.actor)


def test_revoking_the_token_ends_its_console_log_in(http, admin: Caller, make_caller):
    log_in(http, admin.token)
    assert http.get("/admin/").status_code == 200
    other = make_caller("admin", "ops-bob")
    assert other.post(f"/admin/api/clients/{admin.client_id}/revoke").status_code == 200
    assert http.get("/admin/").status_code == 302
    assert http.get("/admin/api/stats").status_code == 401


def test_forms_force_close_and_release_with_csrf(http, admin: Caller, open_session, runtime):
    occupant = open_session("AUTO_BARGAIN")
    waiting = open_session("AUTO_FOLLOW_UP")
    csrf = log_in(http, admin.token)
    url = f"/admin/sessions/{occupant.session_id}/force-close"
    assert http.post(url, data={"reason": "x"}).status_code == 403
    assert http.post(url, data={"reason": "loop", "csrf_token": csrf}).status_code == 302
    assert runtime.sessions.get(occupant.session_id).status == "CANCELLED"
    assert runtime.sessions.get(waiting.session_id).status == "ACTIVE"
    released = http.post("/admin/slots/release", data={
        "account_id": "acc-1", "shop_id": "shop-1", "csrf_token": csrf})
    assert released.status_code == 302
    assert runtime.sessions.get(waiting.session_id).status == "CANCELLED"
    page = http.get("/admin/slots?account_id=acc-1&shop_id=shop-1").get_data(as_text=True)
    assert 'id="slot-free"' in page


def test_every_page_renders_in_english_and_chinese(http, admin: Caller, open_session, runtime):
    session = open_session("AUTO_BARGAIN", owner_id="bot-1")
    log_in(http, admin.token)
    pages = ["/admin/", "/admin/sessions?account_id=acc-1", f"/admin/sessions/{session.session_id}",
             "/admin/slots?account_id=acc-1&shop_id=shop-1", "/admin/transfers",
             "/admin/agents", "/admin/imports"]
    for path in pages:
        response = http.get(path)
        assert response.status_code == 200, path
    english = http.get("/admin/").get_data(as_text=True)
    assert "Sessions by status" in english and "会话" not in english.split("</header>")[1]

    switched = http.get("/admin/lang/zh?next=/admin/sessions")
    assert switched.status_code == 302 and switched.headers["Location"].endswith(
        "/admin/sessions")
    chinese = http.get("/admin/").get_data(as_text=True)
    assert "按状态统计会话" in chinese and 'lang="zh-CN"' in chinese
    detail = http.get(f"/admin/sessions/{session.session_id}").get_data(as_text=True)
    assert "审计时间线" in detail and session.session_id in detail
    assert http.get("/admin/lang/en?next=https://evil.example/").headers["Location"] == "/admin/"

    missing = http.get("/admin/sessions/ses_missing")
    assert missing.status_code == 404 and "ses_missing" in missing.get_data(as_text=True)
    bad = http.get("/admin/sessions?status=SLEEPING")
    assert bad.status_code == 422 and "status" in bad.get_data(as_text=True)


def test_the_live_desk_shows_first_response_and_hand_back_in_both_languages(
        http, admin: Caller, open_session, runtime: Runtime):
    from datetime import timedelta

    from app.db import utcnow
    from app.sweeps.service import sweep_first_responses
    from app.transfers.schemas import HandBackRequest, TransferRequest

    service = runtime.sessions
    robot = open_session("AUTO_BARGAIN", shop="s-silent")
    silent = service.transfer(robot.session_id, TransferRequest(reason="help"), actor="bot")
    service.accept_transfer(silent.transfer_id, agent_id="agent-7", actor="desk")
    sweep_first_responses(runtime, now=utcnow() + timedelta(seconds=121))
    other = open_session("AUTO_BARGAIN", shop="s-back")
    service.transfer(other.session_id, TransferRequest(reason="help"), actor="bot")
    back = service.hand_back(other.session_id, HandBackRequest(
        summary="done", outcome="needs_robot"), actor="desk")
    assert back.resumed is not None
    log_in(http, admin.token)

    page = http.get("/admin/transfers").get_data(as_text=True)
    handled = page.split('id="transfer-accepted"')[1]
    assert robot.session_id in handled and "agent-7" in handled
    assert 'class="overdue"' in handled and "overdue" in handled
    assert "First response" in http.get("/admin/").get_data(as_text=True)
    detail = http.get(f"/admin/sessions/{other.session_id}").get_data(as_text=True)
    assert f'id="handed-back-to">{back.resumed.session_id}<' in detail
    http.get("/admin/lang/zh?next=/admin/")
    assert "超时未响应" in http.get("/admin/transfers").get_data(as_text=True)
    assert "首次响应中位数" in http.get("/admin/").get_data(as_text=True)
    assert "已转回机器人会话" in http.get(
        f"/admin/sessions/{other.session_id}").get_data(as_text=True)
