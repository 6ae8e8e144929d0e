"""The console's upload with grouping options, the job page showing them, and the session
page saying why an imported session starts where it does — in a real browser, in both
languages (the fixtures of `test_console_browser`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from app.runtime import Runtime
from tests.admin.test_console_browser import (  # noqa: F401 (fixtures)
    admin_token,
    browser,
    log_in,
    page,
    server,
    settings,
)
from tests.imports.helpers import sessions_of

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)


def threaded_export() -> bytes:
    rows = []
    for i in range(4):  # one thread, an hour between its messages
        rows.append({"account_id": "acc-1", "shop_id": "shop-t", "message_id": f"t{i}",
                     "sender_role": "counterpart" if i % 2 == 0 else "human",
                     "content": f"thread message {i}", "thread_id": "CONV-9",
                     "sent_at": (T0 + timedelta(hours=i)).isoformat()})
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_upload_with_grouping_options_and_the_session_says_why_it_starts(  # noqa: F811
        page: Any, server: str, admin_token: str, runtime: Runtime,  # noqa: F811
        tmp_path: Path):
    upload = tmp_path / "threads.ndjson"
    upload.write_bytes(threaded_export())
    log_in(page, server, admin_token)
    page.click('a[data-nav="imports"]')
    page.fill("#upload-session-gap", "7200")
    page.select_option("#upload-grouping", "threads")
    assert page.is_disabled("#upload-review")  # no review endpoint configured
    page.set_input_files("#upload-file", str(upload))
    page.click("#upload-submit")
    page.wait_for_selector("#upload-progress[data-done]")
    assert page.get_attribute("#upload-progress", "data-done") == "succeeded"
    page.click("#import-summary a")
    grouping = page.inner_text("#job-grouping")
    assert "threads only" in grouping and "7200" in grouping and "off" in grouping

    (session,) = sessions_of(runtime, "shop-t")
    assert (session.started_by, session.thread_id, session.message_count) == (
        "thread", "CONV-9", 4)
    page.goto(f"{server}/admin/sessions/{session.session_id}")
    assert page.inner_text("#started-by") == "thread · thread CONV-9"
    page.click("#lang-zh")
    page.wait_for_selector('html[lang="zh-CN"]')
    assert page.inner_text("#started-by") == "线程 · 线程 CONV-9"
    assert "分段依据" in page.inner_text("main")
