"""Webhook test fixtures: the HTTP API fixtures (app, http, make_caller), and the URL
policy's switch.

The receivers of these tests listen on 127.0.0.1, which the webhook URL policy refuses
by default, so here WEBHOOK_ALLOW_PRIVATE is on unless a test says otherwise with
``@pytest.mark.parametrize("allow_private", [False])`` (a parameter overrides the
fixture of the same name)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import Settings
from tests.api.conftest import app, http, make_caller  # noqa: F401
from tests.conftest import Backend


@pytest.fixture
def allow_private() -> bool:
    """WEBHOOK_ALLOW_PRIVATE for this test's settings and the processes it starts."""
    return True


@pytest.fixture
def settings(backend: Backend, tmp_path: Path, allow_private: bool) -> Settings:
    return backend.settings(tmp_path, webhook_allow_private=allow_private)


@pytest.fixture(autouse=True)
def _policy_for_subprocesses(monkeypatch: pytest.MonkeyPatch, allow_private: bool) -> None:
    """Servers and workers started by a test get the same switch (`Backend.env()` copies
    this process's environment)."""
    monkeypatch.setenv("WEBHOOK_ALLOW_PRIVATE", "true" if allow_private else "false")
