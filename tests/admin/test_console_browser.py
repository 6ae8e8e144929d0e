"""The admin console in a real browser: Debian's Chromium, headless, driven by Playwright
(`executable_path`; Playwright never downloads a browser), against the real app served by
werkzeug on 127.0.0.1 in a thread of the test process, on the test's runtime.

One browser for the module; each test gets its own runtime, server and browser context.
Without Chromium the module skips with the reason — except under CI=true, where
`.ci/browser` installs it and its absence fails the run.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import make_server

from app.clients.service import ClientService
from app.config import Settings
from app.db import utcnow
from app.factory import create_app
from app.messages.service import LiveMessage
from app.runtime import Runtime
from app.sessions.enums import SenderRole, SessionType
from app.sessions.schemas import SessionRequest
from app.transfers.schemas import TransferRequest
from tests.admin.conftest import GENEROUS_RATE_LIMITS
from tests.shared_data import TWCS_CSV

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TWCS = TWCS_CSV
SHOTS_ENV = "ADMIN_SCREENSHOT_DIR"  # set it to keep a copy of the screenshots for a human

if IN_CI:
    import playwright.sync_api as playwright_sync  # a dev dependency: must be there in CI
else:
    playwright_sync = pytest.importorskip("playwright.sync_api")

if CHROMIUM is None:
    if IN_CI:
        raise RuntimeError("CI=true but no chromium: .ci/browser should have installed it")
    pytest.skip("no chromium on this machine (run .ci/browser to install Debian's)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def settings(backend, tmp_path: Path) -> Settings:  # type: ignore[no-untyped-def]
    """Small chunks, so an upload of a few hundred rows moves the bar in several steps."""
    return backend.settings(tmp_path, batch_size=40, **GENEROUS_RATE_LIMITS)


@pytest.fixture
def server(runtime: Runtime) -> Iterator[str]:
    app = create_app(runtime)
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, name="admin-console-server",
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{http.server_port}"
    finally:
        http.shutdown()
        thread.join(10)


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    context.set_default_timeout(20_000)
    tab = context.new_page()
    errors: list[str] = []
    refused: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("console", lambda message: refused.append(message.text)
           if "Content Security Policy" in message.text else None)
    try:
        yield tab
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not refused, f"the console's CSP refused something on its own pages: {refused}"


@pytest.fixture
def admin_token(runtime: Runtime) -> str:
    return ClientService(runtime.database).create(name="ops-alice", role="admin").token


def log_in(page: Any, server: str, token: str) -> None:
    page.goto(f"{server}/admin/")
    assert "/admin/login" in page.url
    page.fill("#token", token)
    page.click("#login-submit")
    page.wait_for_url(f"{server}/admin/")


def keep(path: Path) -> None:
    target = os.environ.get(SHOTS_ENV)
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def seed_sessions(runtime: Runtime) -> str:
    """A robot conversation handed to the desk, plus some traffic for the charts."""
    service = runtime.sessions
    for i in range(3):
        service.create(SessionRequest(account_id=f"acc-{i}", shop_id="shop-x",
                                      session_type=SessionType.AUTO_FOLLOW_UP), actor="client:t")
    bot = service.create(SessionRequest(account_id="acc-bargain", shop_id="shop-42",
                                        session_type=SessionType.AUTO_BARGAIN, owner_id="bot-7"),
                         actor="client:bot").session
    service.create(SessionRequest(account_id="acc-bargain", shop_id="shop-42",
                                  session_type=SessionType.AUTO_FOLLOW_UP), actor="client:bot")
    now = utcnow()
    service.record_messages(bot.session_id, [
        LiveMessage(message_id="b1", sender_role=SenderRole.ROBOT,
                    content="您好，这款商品可以给您优惠价 88 元", sent_at=now),
        LiveMessage(message_id="b2", sender_role=SenderRole.COUNTERPART,
                    content="能再便宜点吗？", sent_at=now + timedelta(seconds=5)),
    ], actor="client:bot")
    service.transfer(bot.session_id, TransferRequest(reason="customer wants a person",
                                                     urgency=2), actor="client:bot")
    return bot.session_id


def test_operator_logs_in_searches_and_reads_a_session_timeline(
        page: Any, server: str, admin_token: str, runtime: Runtime, tmp_path: Path):
    session_id = seed_sessions(runtime)
    log_in(page, server, admin_token)

    assert page.inner_text("#stat-sessions") == "5"
    assert page.inner_text("#stat-waiting") == "1"
    bars = page.locator('.chart[data-series="sessions_started"] svg rect')
    assert bars.count() == 24
    assert bars.nth(23).get_attribute("data-value") == "5"
    assert page.locator(".chart svg").count() == 4
    assert "Sessions by status" in page.inner_text("main")
    dashboard_shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(dashboard_shot), full_page=True)
    assert dashboard_shot.stat().st_size > 10_000
    keep(dashboard_shot)

    page.click('a[data-nav="sessions"]')
    page.fill('input[name="account_id"]', "acc-bargain")
    page.select_option('select[name="session_type"]', "AUTO_BARGAIN")
    page.click("#search-submit")
    rows = page.locator("#session-results tbody tr")
    assert rows.count() == 1
    assert "TRANSFERRED" in rows.first.inner_text()
    page.click(f"text={session_id}")
    page.wait_for_url(f"{server}/admin/sessions/{session_id}")

    assert page.inner_text("#session-status") == "TRANSFERRED"
    conversation = page.inner_text("#conversation")
    assert "您好，这款商品可以给您优惠价 88 元" in conversation
    assert "能再便宜点吗？" in conversation
    timeline = page.inner_text("#audit-timeline")
    for operation in ("create", "activate", "transfer", "transfer offered"):
        assert operation in timeline
    assert "PENDING → ACTIVE" in timeline
    page.click("#verify-chain")
    page.wait_for_selector("#verify-result.ok")
    assert "intact" in page.inner_text("#verify-result")
    session_shot = tmp_path / "session.png"
    page.screenshot(path=str(session_shot), full_page=True)
    keep(session_shot)

    page.click("#slot-link")
    assert page.locator("#slot-occupant").inner_text().count(session_id) == 1
    assert "AUTO_FOLLOW_UP" in page.inner_text("#slot-waiting")
    page.click('a[data-nav="transfers"]')
    assert session_id in page.inner_text("#transfer-queue")


def twcs_export(records: int) -> tuple[bytes, int]:
    """The first `records` real tweets as our export CSV: brand account ↔ customer.
    Tweets whose counterpart cannot be told from the text keep an empty shop_id: real
    rows the import must refuse with their line number. Answers (file, bad rows)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["message_id", "account_id", "shop_id", "sender_role", "sender_id",
                     "content", "sent_at"])
    bad = 0
    with TWCS.open(newline="", encoding="utf-8") as source:
        for i, row in enumerate(csv.DictReader(source)):
            if i >= records:
                break
            mention = row["text"].split()[0].lstrip("@") if row["text"].startswith("@") else ""
            inbound = row["inbound"] == "True"
            brand, customer = (mention, row["author_id"]) if inbound else (row["author_id"],
                                                                           mention)
            if not mention or (inbound and mention.isdigit()):
                customer = ""
                bad += 1
            sent = datetime.strptime(row["created_at"], "%a %b %d %H:%M:%S %z %Y")
            writer.writerow([f"twcs-{row['tweet_id']}", brand, customer,
                             "counterpart" if inbound else "human", row["author_id"],
                             row["text"], sent.isoformat()])
    return out.getvalue().encode("utf-8"), bad


def test_history_upload_shows_live_progress_and_the_row_errors(
        page: Any, server: str, admin_token: str, tmp_path: Path):
    export, bad = twcs_export(400)
    assert bad > 0
    upload = tmp_path / "twcs-export.csv"
    upload.write_bytes(export)
    log_in(page, server, admin_token)
    page.click('a[data-nav="imports"]')
    page.set_input_files("#upload-file", str(upload))
    page.click("#upload-submit")

    seen: list[int] = []
    fill = page.locator("#progress-fill")
    page.wait_for_selector("#upload-progress:not([hidden])")
    while page.get_attribute("#upload-progress", "data-done") is None:
        seen.append(int(fill.get_attribute("aria-valuenow") or 0))
        page.wait_for_timeout(50)
        assert len(seen) < 1200, "the import did not finish"
    seen.append(int(fill.get_attribute("aria-valuenow") or 0))
    assert seen[-1] == 100
    assert seen == sorted(seen), "the bar never goes backwards"
    assert any(0 < value < 100 for value in seen), f"no step between 0 and 100: {seen}"
    assert page.get_attribute("#upload-progress", "data-done") == "partially_succeeded"

    page.wait_for_selector("#upload-errors")
    summary = page.inner_text("#import-summary")
    assert "partially_succeeded" in summary and "Rows 400" in summary
    error_rows = page.locator("#upload-errors tr")
    assert error_rows.count() == bad + 1  # + header
    assert "shop_id" in error_rows.nth(1).inner_text()
    shot = tmp_path / "import.png"
    page.screenshot(path=str(shot), full_page=True)
    keep(shot)

    page.click("#import-summary a")
    assert page.inner_text("#job-status") == "partially_succeeded"
    assert page.locator("#row-errors tbody tr").count() == bad


def test_language_switch_turns_the_console_chinese_and_back(
        page: Any, server: str, admin_token: str, tmp_path: Path):
    log_in(page, server, admin_token)
    assert page.inner_text('a[data-nav="dashboard"]') == "Dashboard"
    page.click("#lang-zh")
    page.wait_for_selector('html[lang="zh-CN"]')
    assert page.inner_text('a[data-nav="dashboard"]') == "仪表盘"
    assert "按状态统计会话" in page.inner_text("main")
    page.click('a[data-nav="imports"]')
    assert "上传聊天记录" in page.inner_text("main")
    shot = tmp_path / "dashboard-zh.png"
    page.click('a[data-nav="dashboard"]')
    page.screenshot(path=str(shot), full_page=True)
    keep(shot)
    page.click("#lang-en")
    page.wait_for_selector('html[lang="en"]')
    assert page.inner_text('a[data-nav="dashboard"]') == "Dashboard"
