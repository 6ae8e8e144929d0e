"""`/docs` in headless Chromium: Swagger UI renders the operations from this server's
assets only, and "try it out" calls the API with the token given under "Authorize",
which survives a reload (persistAuthorization)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from werkzeug.serving import make_server

from app.clients.service import ClientService
from app.factory import create_app
from app.runtime import Runtime
from app.sessions.enums import SessionType
from app.sessions.schemas import SessionRequest
from tests.admin.test_console_browser import browser  # noqa: F401 - the Chromium fixture


@pytest.fixture
def server(runtime: Runtime) -> Iterator[str]:
    http = make_server("127.0.0.1", 0, create_app(runtime), threaded=True)
    thread = threading.Thread(target=http.serve_forever, name="docs-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{http.server_port}"
    finally:
        http.shutdown()
        thread.join(10)


def test_swagger_ui_renders_and_tries_an_operation_with_the_bearer_token(
        browser: Any, server: str, runtime: Runtime) -> None:  # noqa: F811
    issued = ClientService(runtime.database).create(name="docs-bot", role="bot")
    created = runtime.sessions.create(
        SessionRequest(account_id="acc-docs", shop_id="shop-docs",
                       session_type=SessionType.AUTO_BARGAIN),
        actor=f"client:{issued.client_id}", client_id=issued.client_id).session
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(20_000)
    tab = context.new_page()
    errors: list[str] = []
    foreign: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("request", lambda r: foreign.append(r.url) if not r.url.startswith(server)
           and not r.url.startswith("data:") else None)
    try:
        tab.goto(f"{server}/docs")
        tab.wait_for_selector(".opblock-summary-path")
        paths = set(tab.locator(".opblock-summary-path").all_inner_texts())
        assert {"/api/v1/sessions", "/api/v1/events"} <= {p.replace("\u200b", "")
                                                          for p in paths}

        tab.click("button.authorize")
        tab.fill(".auth-container input", issued.token)
        tab.click(".auth-btn-wrapper button.authorize")
        tab.click(".auth-btn-wrapper button.btn-done")

        operation = tab.locator(".opblock-get", has=tab.locator(
            ".opblock-summary-path[data-path='/api/v1/sessions']")).first
        operation.locator(".opblock-summary").click()
        operation.locator(".try-out__btn").click()
        operation.locator(".execute").click()
        status = operation.locator(".live-responses-table tr.response .response-col_status").first
        status.wait_for()
        assert status.inner_text().strip().startswith("200")
        body = operation.locator(".live-responses-table .microlight").first.inner_text()
        assert created.session_id in body

        tab.reload()  # the token is kept (persistAuthorization)
        tab.wait_for_selector(".opblock-summary-path")
        kept = tab.evaluate("window.localStorage.getItem('authorized')")
        assert kept and issued.token in kept
    finally:
        context.close()
    assert not errors, errors
    assert not foreign, f"requests left the server: {foreign}"
