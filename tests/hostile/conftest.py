"""Fixtures of the hostile-input suite: the API's callers, plus a fingerprint of
everything stored, so that a test can assert that a refused request wrote nothing."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from app.models import Base
from app.runtime import Runtime
from app.sessions.models import Session, Slot
from tests.api.conftest import (  # noqa: F401 - fixtures shared with the API tests
    Caller,
    _fresh_event_ids,
    admin,
    app,
    bot,
    desk,
    http,
    make_caller,
    other_bot,
)


def stored_state(runtime: Runtime) -> dict[str, Any]:
    """Row counts of every table, the slots' fences and the sessions' latest activity:
    a refused request must leave all of them as they were."""
    state: dict[str, Any] = {}
    with runtime.database.read() as db:
        for table in Base.metadata.sorted_tables:
            state[table.name] = db.execute(select(func.count()).select_from(table)).scalar_one()
        state["fences"] = db.execute(select(func.coalesce(func.sum(Slot.fence), 0))).scalar_one()
        state["activity"] = db.execute(select(func.max(Session.last_activity_at))).scalar_one()
        state["messages_counted"] = db.execute(
            select(func.coalesce(func.sum(Session.message_count), 0))).scalar_one()
    return state


@pytest.fixture
def snapshot(runtime: Runtime):  # type: ignore[no-untyped-def]
    return lambda: stored_state(runtime)


def assert_everyone_still_served(a_bot: Caller, the_desk: Caller, an_admin: Caller) -> None:
    """Other clients' reads keep working after a hostile request (lists included)."""
    for caller, path in ((a_bot, "/api/v1/sessions"), (the_desk, "/api/v1/sessions"),
                         (the_desk, "/api/v1/transfers"), (an_admin, "/api/v1/sessions"),
                         (an_admin, "/api/v1/events"),
                         (an_admin, "/api/v1/transfers?status=all")):
        response = caller.http.get(path, headers=caller.headers())
        assert response.status_code == 200, (path, response.get_data(as_text=True)[:300])
        response.get_json()  # valid JSON, whatever was stored before
