"""The console's corrections card in a real browser (headless Chromium, as in
`test_console_browser.py`): an operator merges a session into another and splits it
again from the session page, confirming each, and follows the links both ways."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.audit.models import Operation
from app.db import utcnow
from app.messages.service import LiveMessage
from app.runtime import Runtime
from app.sessions.enums import SenderRole, SessionType
from app.sessions.schemas import SessionRequest
from tests.admin import test_console_browser as console_browser
from tests.admin.test_console_browser import keep, log_in

# the browser, the server on the test's runtime, a page with its checks, an admin token
browser = console_browser.browser
settings = console_browser.settings
server = console_browser.server
page = console_browser.page
admin_token = console_browser.admin_token


def chat(runtime: Runtime, contents: list[str], minutes_ago: int) -> tuple[str, list[str]]:
    """An ended robot conversation of (acc-1, shop-1) with these messages."""
    service = runtime.sessions
    sid = service.create(SessionRequest(account_id="acc-1", shop_id="shop-1",
                                        session_type=SessionType.AUTO_BARGAIN),
                         actor="client:bot").session.session_id
    start = utcnow() - timedelta(minutes=minutes_ago)
    ids = [f"{sid}-{i}" for i in range(len(contents))]
    service.record_messages(sid, [
        LiveMessage(message_id=mid, content=text, sent_at=start + timedelta(minutes=i),
                    sender_role=SenderRole.COUNTERPART if i % 2 == 0 else SenderRole.ROBOT)
        for i, (mid, text) in enumerate(zip(ids, contents, strict=True))], actor="client:bot")
    service.complete(sid, actor="client:bot")
    return sid, ids


def test_operator_merges_and_splits_sessions_from_the_session_page(
        page: Any, server: str, admin_token: str, runtime: Runtime, tmp_path: Path):
    first, first_ids = chat(runtime, ["这个多少钱？", "88 元", "能便宜点吗？"], 120)
    second, second_ids = chat(runtime, ["那 80 元可以吗？", "可以，帮您改价"], 60)
    log_in(page, server, admin_token)
    page.on("dialog", lambda dialog: dialog.accept())  # the forms ask for confirmation

    page.goto(f"{server}/admin/sessions/{second}")
    assert "Corrections (merge and split)" in page.inner_text("#corrections")
    page.fill("#merge-into", first)
    page.fill("#merge-reason", "one bargaining chat cut by the gap rule")
    page.click("#merge-submit")
    page.wait_for_url(f"{server}/admin/sessions/{first}")
    conversation = page.inner_text("#conversation")
    for text in ("这个多少钱？", "那 80 元可以吗？", "可以，帮您改价"):
        assert text in conversation
    assert second in page.inner_text("#merged-from")
    assert "merge" in page.inner_text("#audit-timeline")
    shot = tmp_path / "session-merged.png"
    page.screenshot(path=str(shot), full_page=True)
    keep(shot)

    page.click(f"#merged-from a:text('{second}')")
    page.wait_for_url(f"{server}/admin/sessions/{second}")
    assert page.inner_text("#merged-into-link") == first
    assert page.locator("#merge-form").count() == 0
    assert "none" in page.inner_text("#conversation")
    page.click("#merged-into-link")
    page.wait_for_url(f"{server}/admin/sessions/{first}")

    options = page.locator("#split-messages option")
    assert options.count() == 4  # every message but the first
    page.fill("#split-at", second_ids[0])
    page.fill("#split-reason", "two conversations after all")
    page.click("#split-submit")
    page.wait_for_url(f"{server}/admin/sessions/{first}")
    assert "那 80 元可以吗？" not in page.inner_text("#conversation")
    page.click("#split-into a")
    page.wait_for_selector("#split-from-link")
    assert page.inner_text("#split-from-link") == first
    tail_conversation = page.inner_text("#conversation")
    assert "那 80 元可以吗？" in tail_conversation and "能便宜点吗？" not in tail_conversation

    page.click("#lang-zh")
    page.wait_for_selector('html[lang="zh-CN"]')
    assert "拆分自" in page.inner_text("#corrections")
    shot = tmp_path / "session-split-zh.png"
    page.screenshot(path=str(shot), full_page=True)
    keep(shot)

    with runtime.database.read() as db:
        actors = set(db.execute(select(Operation.actor).where(
            Operation.operation.in_(["merge", "split"]))).scalars())
    assert len(actors) == 1 and actors.pop().startswith("client:")


def test_a_refused_merge_shows_why(page: Any, server: str, admin_token: str,
                                   runtime: Runtime):
    done, _ = chat(runtime, ["你好", "您好"], 30)
    live = runtime.sessions.create(SessionRequest(
        account_id="acc-1", shop_id="shop-1", session_type=SessionType.AUTO_FOLLOW_UP),
        actor="client:bot").session.session_id
    log_in(page, server, admin_token)
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(f"{server}/admin/sessions/{live}")
    assert "occupies the slot" in page.inner_text("#correction-unavailable")
    page.goto(f"{server}/admin/sessions/{done}")
    page.fill("#merge-into", live)
    page.fill("#merge-reason", "wrong one")
    page.click("#merge-submit")
    assert "occupies the slot" in page.inner_text("main")
    page.goto(f"{server}/admin/sessions/{done}")
    assert "您好" in page.inner_text("#conversation")
