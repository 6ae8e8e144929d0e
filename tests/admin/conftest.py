"""Fixtures for the admin API and console: the app on the test runtime, callers by role,
and sessions built through the real session service."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.clients.service import ClientService
from app.factory import create_app
from app.runtime import Runtime
from app.sessions.enums import SessionType
from app.sessions.schemas import SessionRequest, SessionView
from tests.conftest import GENEROUS_RATE_LIMITS  # noqa: F401 - used by the browser tests


class Caller:
    """An API client with its bearer token."""

    def __init__(self, http: FlaskClient, client_id: str, token: str, role: str,
                 name: str) -> None:
        self.http = http
        self.client_id = client_id
        self.token = token
        self.role = role
        self.name = name

    @property
    def actor(self) -> str:
        return f"client:{self.client_id}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, **params: Any):  # type: ignore[no-untyped-def]
        return self.http.get(path, query_string=params, headers=self.headers())

    def post(self, path: str, body: Any = None, **kwargs: Any):  # type: ignore[no-untyped-def]
        return self.http.post(path, json=body, headers=self.headers(), **kwargs)


@pytest.fixture
def app(runtime: Runtime) -> Flask:
    return create_app(runtime, TESTING=True)


@pytest.fixture
def http(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def make_caller(runtime: Runtime, http: FlaskClient):  # type: ignore[no-untyped-def]
    clients = ClientService(runtime.database)

    def make(role: str, name: str | None = None) -> Caller:
        name = name or f"{role}-client"
        issued = clients.create(name=name, role=role)
        return Caller(http, issued.client_id, issued.token, role, name)

    return make


@pytest.fixture
def admin(make_caller) -> Caller:  # type: ignore[no-untyped-def]
    return make_caller("admin", "ops-alice")


@pytest.fixture
def open_session(runtime: Runtime):  # type: ignore[no-untyped-def]
    """Create a session through the service (as a bot or desk client would)."""

    def create(session_type: str | SessionType, account: str = "acc-1", shop: str = "shop-1",
               **fields: Any) -> SessionView:
        request = SessionRequest(account_id=account, shop_id=shop,
                                 session_type=SessionType(session_type), **fields)
        return runtime.sessions.create(request, actor="client:test").session

    return create
