"""The console's live pages in headless Chromium (SPEC §12): the transfer queue and the
slot page follow the event stream — a transfer a bot makes through the API appears on
the open queue page without a reload, in both languages.

On MariaDB + Redis the page's stream is the Procfile's real `stream` process (another
port of the same host: the console cookie goes along, CORS and the page's CSP allow
it); on the embedded default the console's own server serves it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.clients.service import ClientService
from app.config import Settings
from app.runtime import Runtime
from tests.admin.conftest import GENEROUS_RATE_LIMITS
from tests.admin.test_console_browser import (  # noqa: F401  (fixtures)
    admin_token,
    browser,
    log_in,
    page,
    server,
)
from tests.api.test_event_stream import _stop, _wait_ready, seed_event
from tests.api.test_server_e2e import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SECRET = "live-console-test-secret"


@pytest.fixture
def stream_port() -> int:
    return free_port()


@pytest.fixture
def settings(backend, tmp_path: Path, stream_port: int) -> Settings:  # type: ignore[no-untyped-def]
    return backend.settings(tmp_path, secret_key=SECRET, stream_port=stream_port,
                            **GENEROUS_RATE_LIMITS)


@pytest.fixture
def stream_process(runtime: Runtime, backend, stream_port: int,  # type: ignore[no-untyped-def]
                   server: str) -> Iterator[None]:  # noqa: F811
    """The `stream` process beside the console on MariaDB + Redis (none when embedded);
    the console's origin is not this host's PORT, so it is listed."""
    if not backend.is_mysql:
        yield
        return
    seed_event(runtime)
    env = {**backend.env(), "SECRET_KEY": SECRET, "STREAM_PORT": str(stream_port),
           "STREAM_CORS_ORIGINS": server}
    proc = subprocess.Popen(
        [str(BIN / "gunicorn"), "--config", "gunicorn_stream.conf.py", "--bind",
         f"127.0.0.1:{stream_port}", "--no-control-socket", "app.stream_wsgi:app"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_ready(f"http://127.0.0.1:{stream_port}", proc)
        yield
    finally:
        _stop(proc)


class Bot:
    """A bot client of the API served beside the console."""

    def __init__(self, server: str, runtime: Runtime) -> None:  # noqa: F811
        token = ClientService(runtime.database).create(name="bot", role="bot").token
        self.server = server
        self.auth = {"Authorization": f"Bearer {token}"}

    def create(self, account: str, shop: str) -> str:
        created = httpx.post(f"{self.server}/api/v1/sessions", headers=self.auth, timeout=10,
                             json={"account_id": account, "shop_id": shop,
                                   "session_type": "AUTO_BARGAIN"})
        assert created.status_code == 201, created.text
        return str(created.json()["session_id"])

    def transfer(self, session_id: str) -> None:
        moved = httpx.post(f"{self.server}/api/v1/sessions/{session_id}/transfer",
                           headers=self.auth, timeout=10,
                           json={"reason": "customer asks for a person", "urgency": 3})
        assert moved.status_code in (200, 201), moved.text


@pytest.mark.parametrize("language", ["en", "zh"])
def test_a_transfer_made_through_the_api_appears_on_the_open_queue_without_reload(
        page: Any, server: str, admin_token: str, runtime: Runtime,  # noqa: F811
        stream_process: None, language: str) -> None:
    log_in(page, server, admin_token)
    page.goto(f"{server}/admin/lang/{language}?next=/admin/transfers")
    page.wait_for_selector('#live[data-state="live"]')
    status = page.inner_text("#live .live-status")
    assert status == ("实时：本页自动更新" if language == "zh" else
                      "Live: this page updates by itself")
    page.evaluate("window.__notReloaded = true")
    assert "acc-live" not in page.inner_text("#transfer-queue")

    bot = Bot(server, runtime)
    session_id = bot.create("acc-live", "shop-live")
    bot.transfer(session_id)
    page.wait_for_function(
        "id => document.getElementById('transfer-queue').innerText.includes(id)",
        arg=session_id, timeout=5000)
    assert page.evaluate("window.__notReloaded") is True
    row = page.inner_text("#transfer-queue")
    assert "customer asks for a person" in row and "acc-live / shop-live" in row
    assert ("紧急程度" if language == "zh" else "Urgency") in page.inner_text(
        "#transfer-queue thead")  # the swapped table is in the page's language


def test_the_slot_page_follows_its_slot_live(
        page: Any, server: str, admin_token: str, runtime: Runtime,  # noqa: F811
        stream_process: None) -> None:
    bot = Bot(server, runtime)
    session_id = bot.create("acc-s", "shop-s")
    log_in(page, server, admin_token)
    page.goto(f"{server}/admin/slots?account_id=acc-s&shop_id=shop-s")
    page.wait_for_selector('#live[data-state="live"]')
    page.evaluate("window.__notReloaded = true")
    assert "ACTIVE" in page.inner_text("#slot-occupant")
    assert page.locator("#slot-waiting").inner_text().count("AUTO_BARGAIN") == 0

    bot.transfer(session_id)
    page.wait_for_function(
        "() => document.getElementById('slot-occupant').innerText.includes('TRANSFERRED')",
        timeout=5000)
    queued = bot.create("acc-s", "shop-s")  # waits behind the transferred one
    page.wait_for_function(
        "id => document.getElementById('slot-waiting').innerText.includes(id)",
        arg=queued, timeout=5000)
    assert page.evaluate("window.__notReloaded") is True
