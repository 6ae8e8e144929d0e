"""The events feed: scoped per client, resumable, never skipping an event that commits late."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import insert

from app.db import utcnow
from app.events.models import Event


def drain(caller, after: int = 0, limit: int = 3) -> tuple[list[dict], int]:  # type: ignore[no-untyped-def]
    items: list[dict] = []
    while True:
        page = caller.get("/api/v1/events", after=after, limit=limit).get_json()
        items += page["items"]
        if page["next"] == after:
            return items, after
        after = page["next"]


def test_feed_is_scoped_per_client(bot, other_bot, desk, admin):
    mine = bot.create("AUTO_BARGAIN")["session_id"]
    theirs = other_bot.create("AUTO_BARGAIN", shop="s2")["session_id"]
    human = desk.create("MANUAL_CUSTOMER_SERVICE", shop="s3")["session_id"]
    bot_events, _ = drain(bot)
    assert {e["session_id"] for e in bot_events} == {mine}
    assert [e["type"] for e in bot_events] == ["session.activated"]
    desk_events, _ = drain(desk)
    assert {e["session_id"] for e in desk_events} == {human}
    admin_events, _ = drain(admin)
    assert {e["session_id"] for e in admin_events} == {mine, theirs, human}
    # once the bot hands its session over, the desk follows that session too
    bot.post(f"/api/v1/sessions/{mine}/transfer", {"reason": "refund"})
    desk_events, _ = drain(desk)
    assert {"transfer.offered", "session.transferred"} <= {
        e["type"] for e in desk_events if e["session_id"] == mine}
    for event in admin_events:
        assert {"event_id", "type", "session_id", "occurred_at", "data"} <= set(event)


def test_cursor_resumes_without_missing_or_repeating(bot):
    sid = bot.create("AUTO_BARGAIN")["session_id"]
    first, cursor = drain(bot)
    for action in ("pause", "resume", "complete"):
        bot.post(f"/api/v1/sessions/{sid}/{action}")
    second, cursor2 = drain(bot, after=cursor, limit=1)
    ids = [e["event_id"] for e in first + second]
    assert ids == sorted(set(ids))
    assert [e["type"] for e in second] == ["session.paused", "session.resumed",
                                           "session.completed"]
    assert bot.get("/api/v1/events", after=cursor2).get_json() == {"items": [], "next": cursor2}


def _event(pk: int, age: float) -> dict:
    return {"id": pk, "type": "test.event", "audience": "admin",
            "occurred_at": utcnow() - timedelta(seconds=age), "data": {}}


def test_feed_stops_at_a_fresh_hole_and_passes_it_once_settled(runtime, admin):
    """Ids 1, 2, 4: id 3 may belong to a transaction that has not committed yet."""
    with runtime.database.engine.begin() as conn:
        conn.execute(insert(Event), [_event(1, 0), _event(2, 0), _event(4, 0)])
    page = admin.get("/api/v1/events").get_json()
    assert [e["event_id"] for e in page["items"]] == [1, 2] and page["next"] == 2
    with runtime.database.engine.begin() as conn:
        conn.execute(insert(Event), [_event(3, 0)])  # the late commit is served, in order
    page = admin.get("/api/v1/events", after=2).get_json()
    assert [e["event_id"] for e in page["items"]] == [3, 4]


def test_an_old_hole_is_a_rollback_and_is_passed(runtime, admin):
    with runtime.database.engine.begin() as conn:
        conn.execute(insert(Event), [_event(1, 60), _event(3, 60), _event(5, 0)])
    page = admin.get("/api/v1/events").get_json()
    assert [e["event_id"] for e in page["items"]] == [1, 3]


@pytest.mark.services
def test_uncommitted_event_is_never_skipped_on_mysql(runtime, admin, bot):
    """A real out-of-order commit: the reader must wait for the open transaction."""
    with runtime.database.engine.connect() as slow:
        tx = slow.begin()
        slow.execute(insert(Event), [{"type": "slow.event", "audience": "admin",
                                      "occurred_at": utcnow(), "data": {}}])
        bot.create("AUTO_BARGAIN")  # commits an event with a higher id
        page = admin.get("/api/v1/events").get_json()
        assert page["items"] == [] and page["next"] == 0
        tx.commit()
    page = admin.get("/api/v1/events").get_json()
    assert [e["type"] for e in page["items"]] == ["slow.event", "session.activated"]


@pytest.mark.services
def test_an_event_committing_between_the_read_and_the_hole_check_is_not_skipped(
        runtime, admin, bot):
    """MySQL reads at READ COMMITTED: each statement of the feed sees the newest commits.
    The open transaction commits right after the feed read the events (it saw only the
    later one) and before it counted the ids for holes (it then finds none): the feed must
    still serve the late event, before the later one, not pass over it for good."""
    from sqlalchemy import event as sa_event

    slow = runtime.database.engine.connect()
    tx = slow.begin()
    slow.execute(insert(Event), [{"type": "slow.event", "audience": "admin",
                                  "occurred_at": utcnow(), "data": {}}])
    bot.create("AUTO_BARGAIN")  # commits an event with a higher id
    committed: list[str] = []

    def commit_before_the_count(conn, cursor, statement, parameters, context, many):  # type: ignore[no-untyped-def]
        if not committed and "count(" in statement.lower() and "events" in statement:
            tx.commit()  # between the feed's two reads
            committed.append(statement)

    sa_event.listen(runtime.database.engine, "before_cursor_execute", commit_before_the_count)
    try:
        page = admin.get("/api/v1/events").get_json()
    finally:
        sa_event.remove(runtime.database.engine, "before_cursor_execute",
                        commit_before_the_count)
        slow.close()
    assert committed, "the feed never counted the events for holes"
    served = [e["type"] for e in page["items"]]
    assert served[:1] == ["slow.event"], served  # not skipped, and first
    rest, _ = drain(admin, after=page["next"])
    assert served + [e["type"] for e in rest] == ["slow.event", "session.activated"]
