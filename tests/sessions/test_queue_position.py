"""The `position` of a `session.queued` event is the new session's place in line, as
the precedence rules order the line — counted by one query, however long it is."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from app.events.models import Event
from app.runtime import Runtime
from app.sessions import rules
from app.sessions.enums import SessionStatus, SessionType
from app.sessions.models import Session
from tests.sessions.helpers import ask

requests = st.lists(st.tuples(
    st.sampled_from(["AUTO_BARGAIN", "AUTO_FOLLOW_UP", "MANUAL_CUSTOMER_SERVICE",
                     "MANUAL_COMPLAINT"]),
    st.sampled_from([None, 2, 3, 4])), min_size=1, max_size=8)


def line(runtime: Runtime, shop: str) -> list[str]:
    with runtime.database.read() as db:
        rows = db.execute(select(Session).where(
            Session.shop_id == shop, Session.status.in_(["PENDING", "PAUSED"]))).scalars().all()
    ordered = sorted(rows, key=lambda r: rules.precedence(
        session_type=SessionType(r.session_type), priority=r.priority,
        requested_at=r.requested_at, seq=r.id, status=SessionStatus(r.status)))
    return [r.session_id for r in ordered]


counter = iter(range(10**6))


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(asks=requests)
def test_queued_position_is_the_place_in_line(runtime: Runtime, asks: list) -> None:
    shop = f"line-{next(counter)}"
    ask(runtime.sessions, "MANUAL_URGENT", shop=shop)  # nobody preempts it: all wait
    for session_type, priority in asks:
        fields = {"priority": priority} if priority and session_type.startswith("AUTO") \
            and priority >= 3 else {}
        created = ask(runtime.sessions, session_type, shop=shop, **fields).session
        assert created.status == "PENDING"
        with runtime.database.read() as db:
            data = db.execute(select(Event.data).where(
                Event.session_id == created.session_id, Event.type == "session.queued")
            ).scalar_one()
        data = json.loads(data) if isinstance(data, str) else data
        assert data["position"] == line(runtime, shop).index(created.session_id) + 1
