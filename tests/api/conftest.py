"""Fixtures for the HTTP API: the app on the test runtime, and authenticated callers."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.clients.service import ClientService
from app.factory import create_app
from app.runtime import Runtime


class Caller:
    """A client of the API with its bearer token (JSON in, JSON out)."""

    def __init__(self, http: FlaskClient, client_id: str, token: str, role: str) -> None:
        self.http = http
        self.client_id = client_id
        self.token = token
        self.role = role

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **(extra or {})}

    def get(self, path: str, **params: Any):  # type: ignore[no-untyped-def]
        return self.http.get(path, query_string=params, headers=self.headers())

    def post(self, path: str, body: Any = None, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        return self.http.post(path, json=body, headers=self.headers(headers))

    def put(self, path: str, body: Any = None):  # type: ignore[no-untyped-def]
        return self.http.put(path, json=body, headers=self.headers())

    def create(self, session_type: str, account: str = "acc-1", shop: str = "shop-1",
               expect: int = 201, **fields: Any) -> dict[str, Any]:
        body = {"account_id": account, "shop_id": shop, "session_type": session_type, **fields}
        response = self.post("/api/v1/sessions", body)
        assert response.status_code == expect, response.get_json()
        return response.get_json()


@pytest.fixture
def app(runtime: Runtime) -> Flask:
    return create_app(runtime, TESTING=True, EVENTS_SETTLE_SECONDS=5.0)


@pytest.fixture
def http(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def make_caller(runtime: Runtime, http: FlaskClient):  # type: ignore[no-untyped-def]
    service = ClientService(runtime.database)

    def make(role: str, name: str | None = None) -> Caller:
        issued = service.create(name=name or f"{role}-client", role=role)
        return Caller(http, issued.client_id, issued.token, role)

    return make


@pytest.fixture
def bot(make_caller) -> Caller:  # type: ignore[no-untyped-def]
    return make_caller("bot", "bargain-bot")


@pytest.fixture
def other_bot(make_caller) -> Caller:  # type: ignore[no-untyped-def]
    return make_caller("bot", "follow-up-bot")


@pytest.fixture
def desk(make_caller) -> Caller:  # type: ignore[no-untyped-def]
    return make_caller("desk", "desk")


@pytest.fixture
def admin(make_caller) -> Caller:  # type: ignore[no-untyped-def]
    return make_caller("admin", "ops")


@pytest.fixture(autouse=True)
def _fresh_event_ids(runtime: Runtime) -> None:
    """Start event ids at 1 again on MySQL (the clean-up deletes rows but InnoDB keeps
    counting), so that a feed read from cursor 0 sees no "hole" left by earlier tests."""
    if runtime.database.dialect == "mysql":
        with runtime.database.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE events AUTO_INCREMENT = 1")
