"""SPEC §6 webhooks, received by a real HTTP server on 127.0.0.1: signed, retried with
backoff, in order per session, scoped like the events feed, visible to admins."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from app.clients.models import ApiClient
from app.db import utcnow
from app.delivery import signing
from app.delivery.models import WebhookDelivery
from app.delivery.service import (
    deliver_webhooks,
    delivery_log,
    delivery_summary,
    register_webhook,
    retry_delay,
)
from app.events.feed import visible_events
from app.events.models import Event
from app.runtime import build_runtime, set_runtime
from app.sessions.schemas import SessionRequest
from tests.delivery.receiver import WebhookReceiver


def make_client(runtime, client_id, role):
    with runtime.database.unit_of_work() as uow:
        uow.session.add(ApiClient(client_id=client_id, name=client_id, role=role,
                                  token_hash=f"hash-{client_id}", token_prefix="tok",
                                  created_at=utcnow()))
        uow.commit()


def subscribe(runtime, client_id, url, *, allow_private=None):
    """Register `url` under the runtime's WEBHOOK_ALLOW_PRIVATE (or the one given)."""
    if allow_private is None:
        allow_private = runtime.settings.webhook_allow_private
    with runtime.database.unit_of_work() as uow:
        info = register_webhook(uow.session, client_id, url, allow_private=allow_private)
        uow.commit()
    return info.secret


def create(runtime, client_id, session_type="AUTO_BARGAIN", shop="shop-1"):
    request = SessionRequest(account_id="acc-1", shop_id=shop, session_type=session_type)
    return runtime.sessions.create(request, actor=client_id, client_id=client_id).session


def drain(runtime, until, timeout=15.0):
    """Run delivery (as beat and the retry schedule would) until `until()` holds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        deliver_webhooks(runtime, time_budget=5)
        if until():
            return
        time.sleep(0.1)
    raise AssertionError("webhooks not delivered in time")


def events_of(runtime, **where):
    with runtime.database.read() as db:
        stmt = select(Event).order_by(Event.id)
        for key, value in where.items():
            stmt = stmt.where(getattr(Event, key) == value)
        return list(db.execute(stmt).scalars())


@pytest.fixture
def fast_retry_runtime(backend, tmp_path, runtime, allow_private):
    settings = backend.settings(tmp_path, webhook_retry_base=0.2, webhook_max_attempts=4,
                                webhook_timeout=2, webhook_allow_private=allow_private)
    rt = build_runtime(settings)
    rt._schema_checked = True
    set_runtime(rt)
    try:
        yield rt
    finally:
        set_runtime(runtime)
        rt.close()


def test_events_are_signed_and_carry_delivery_id_and_timestamp(fast_retry_runtime):
    rt = fast_retry_runtime
    make_client(rt, "bot-a", "bot")
    with WebhookReceiver() as receiver:
        secret = subscribe(rt, "bot-a", receiver.url)
        assert secret.startswith("whsec_")
        session = create(rt, "bot-a")
        rt.sessions.pause(session.session_id, actor="bot-a")
        expected = events_of(rt, client_id="bot-a")
        drain(rt, lambda: len(receiver.received) >= len(expected))
        got = list(receiver.received)
    assert [r["body"]["event_id"] for r in got] == [e.id for e in expected]
    assert [r["body"]["type"] for r in got] == ["session.activated", "session.paused"]
    for r in got:
        h = r["headers"]
        assert signing.verify(secret, timestamp=h["x-autosession-timestamp"], body=r["raw"],
                              signature=h["x-autosession-signature"])
        assert not signing.verify("whsec_wrong", timestamp=h["x-autosession-timestamp"],
                                  body=r["raw"], signature=h["x-autosession-signature"])
        assert not signing.verify(secret, timestamp=int(h["x-autosession-timestamp"]) - 3600,
                                  body=r["raw"], signature=h["x-autosession-signature"])
        assert h["x-autosession-delivery"].startswith("dlv_")
        assert r["body"]["delivery_id"] == h["x-autosession-delivery"]
        assert r["body"]["data"]["session_id"] == session.session_id


def test_a_receiver_that_fails_twice_still_gets_the_event(fast_retry_runtime):
    rt = fast_retry_runtime
    make_client(rt, "bot-a", "bot")
    with WebhookReceiver() as receiver:
        receiver.fail_first["*"] = 2
        subscribe(rt, "bot-a", receiver.url)
        session = create(rt, "bot-a")
        drain(rt, lambda: len(receiver.received) == 1)
    assert receiver.bodies()[0]["session_id"] == session.session_id
    assert list(receiver.attempts.values()) == [3]
    with rt.database.read() as db:
        (entry,) = delivery_log(db, client_id="bot-a")
    assert entry["status"] == "delivered" and entry["attempts"] == 3
    assert [a["status_code"] for a in entry["attempt_log"]] == [500, 500, 204]
    assert entry["attempt_log"][0]["error"].startswith("HTTP 500")
    assert entry["last_error"] is None


def test_order_per_session_holds_while_other_sessions_flow(fast_retry_runtime):
    rt = fast_retry_runtime
    make_client(rt, "bot-a", "bot")
    with WebhookReceiver() as receiver:
        receiver.fail_first["shop-slow"] = 2  # each of its events fails twice first
        subscribe(rt, "bot-a", receiver.url)
        slow = create(rt, "bot-a", shop="shop-slow")
        fast = create(rt, "bot-a", shop="shop-fast")
        for s in (slow, fast):
            rt.sessions.pause(s.session_id, actor="bot-a")
            rt.sessions.resume(s.session_id, actor="bot-a")
            rt.sessions.complete(s.session_id, actor="bot-a")
        total = len(events_of(rt, client_id="bot-a"))
        drain(rt, lambda: len(receiver.received) == total, timeout=30)
        bodies = receiver.bodies()
    # The healthy session was not held up behind the failing one...
    assert [b["session_id"] for b in bodies[:4]] == [fast.session_id] * 4
    # ...and each session's events arrived in the order they were written.
    for s in (slow, fast):
        mine = [b for b in bodies if b["session_id"] == s.session_id]
        assert [b["type"] for b in mine] == ["session.activated", "session.paused",
                                             "session.resumed", "session.completed"]
        assert [b["event_id"] for b in mine] == sorted(b["event_id"] for b in mine)
    assert all(n == 3 for d, n in receiver.attempts.items()
               if d in {r["headers"]["x-autosession-delivery"] for r in receiver.received
                        if r["body"]["session_id"] == slow.session_id})


def test_a_delivery_is_given_up_after_the_last_attempt_and_stops_blocking(fast_retry_runtime):
    rt = fast_retry_runtime
    make_client(rt, "bot-a", "bot")
    with WebhookReceiver() as receiver:
        receiver.fail_first["session.activated"] = 99
        subscribe(rt, "bot-a", receiver.url)
        session = create(rt, "bot-a")
        rt.sessions.complete(session.session_id, actor="bot-a")
        drain(rt, lambda: len(receiver.received) == 1)
    assert receiver.bodies()[0]["type"] == "session.completed"
    with rt.database.read() as db:
        failed = delivery_log(db, status="FAILED")
        summary = delivery_summary(db)
    assert len(failed) == 1 and failed[0]["attempts"] == 4
    assert failed[0]["last_error"].startswith("HTTP 500")
    assert summary == [{"client_id": "bot-a", "pending": 0, "delivered": 1, "failed": 1,
                        "oldest_pending_at": None}]


def test_each_client_gets_the_events_of_its_scope(runtime):
    for client_id, role in (("bot-a", "bot"), ("bot-b", "bot"), ("desk-1", "desk"),
                            ("admin-1", "admin")):
        make_client(runtime, client_id, role)
    receivers = {c: WebhookReceiver() for c in ("bot-a", "desk-1", "admin-1")}
    for r in receivers.values():
        r.__enter__()
    try:
        for client_id, r in receivers.items():
            subscribe(runtime, client_id, r.url)
        create(runtime, "bot-a", shop="s1")
        create(runtime, "bot-b", shop="s2")
        create(runtime, "desk-1", session_type="MANUAL_CUSTOMER_SERVICE", shop="s3")
        with runtime.database.read() as db:
            want = {c: list(db.execute(select(Event.id).where(visible_events(c, role))
                                       .order_by(Event.id)).scalars())
                    for c, role in (("bot-a", "bot"), ("desk-1", "desk"), ("admin-1", "admin"))}
        assert want["bot-a"] and want["desk-1"] and len(want["admin-1"]) > len(want["bot-a"])
        drain(runtime, lambda: all(len(receivers[c].received) == len(w)
                                   for c, w in want.items()))
        for client_id, r in receivers.items():
            assert sorted(b["event_id"] for b in r.bodies()) == want[client_id]
    finally:
        for r in receivers.values():
            r.__exit__(None, None, None)


def test_a_new_webhook_starts_from_now_not_from_history(runtime):
    make_client(runtime, "bot-a", "bot")
    create(runtime, "bot-a", shop="old")
    with WebhookReceiver() as receiver:
        subscribe(runtime, "bot-a", receiver.url)
        deliver_webhooks(runtime, time_budget=5)
        assert receiver.received == []
        create(runtime, "bot-a", shop="new")
        drain(runtime, lambda: len(receiver.received) == 1)
    with runtime.database.read() as db:
        assert db.execute(select(WebhookDelivery)).scalars().all().__len__() == 1


def test_backoff_doubles_up_to_the_cap():
    assert [retry_delay(n, base=2, cap=30) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]
