"""SPEC §13 redelivery: a given-up webhook delivery is listed (admin API and console, in
both languages) and sent again on an operator's request, audited with the operator
as actor; the real receiver on 127.0.0.1 gets it signed with the client's secret."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, select

from app.audit.models import Operation
from app.audit.trail import check_chain
from app.clients.service import ClientService
from app.delivery import signing
from app.events.models import Event
from app.factory import create_app
from app.sessions.models import Session
from tests.admin.test_console import log_in
from tests.delivery.receiver import WebhookReceiver
from tests.delivery.test_webhooks import (
    create,
    drain,
    fast_retry_runtime,  # noqa: F401 - the fixture `rt` wraps
    make_client,
    subscribe,
)


@pytest.fixture
def rt(fast_retry_runtime):  # type: ignore[no-untyped-def]  # noqa: F811
    """The runtime with fast webhook retries (4 attempts, 0.2 s apart)."""
    return fast_retry_runtime


def test_a_given_up_delivery_is_listed_and_redelivered_signed(rt):
    http = create_app(rt, TESTING=True).test_client()
    admin = ClientService(rt.database).create(name="ops-alice", role="admin")
    auth = {"Authorization": f"Bearer {admin.token}"}
    with WebhookReceiver() as receiver:
        make_client(rt, "bot-a", "bot")
        secret = subscribe(rt, "bot-a", receiver.url)
        receiver.fail_first["session.activated"] = 99
        session = create(rt, "bot-a")
        rt.sessions.complete(session.session_id, actor="bot-a")
        drain(rt, lambda: len(receiver.received) == 1)

        listed = http.get("/admin/api/deliveries?status=failed", headers=auth).get_json()
        (failed,) = listed["items"]
        assert (failed["event_type"], failed["status"], failed["attempts"]) == (
            "session.activated", "failed", 4)
        delivery_id = failed["delivery_id"]
        assert http.get("/admin/api/deliveries?status=bogus",
                        headers=auth).status_code == 422
        assert http.get("/admin/api/deliveries?status=FAILED", headers=auth).get_json()[
            "items"] == listed["items"]

        receiver.fail_first.clear()  # the receiver is fixed
        bad = http.post(f"/admin/api/deliveries/{delivery_id}/redeliver",
                        json={"reason": ""}, headers=auth)
        assert bad.status_code == 422 and "reason" in str(bad.get_json()["errors"])
        answer = http.post(f"/admin/api/deliveries/{delivery_id}/redeliver",
                           json={"reason": "receiver fixed"}, headers=auth)
        assert answer.status_code == 200, answer.get_json()
        body = answer.get_json()
        # Pending again with a fresh round of attempts (on the embedded default the run
        # it starts may have delivered it already, at its first new attempt).
        assert (body["status"], body["attempts"]) in {("pending", 0), ("delivered", 1)}
        assert body["redelivered_by"] == f"client:{admin.client_id}"
        drain(rt, lambda: len(receiver.received) == 2)
        got = receiver.received[-1]

    assert got["body"]["type"] == "session.activated"
    assert got["body"]["session_id"] == session.session_id
    headers = got["headers"]
    assert headers["x-autosession-delivery"] == delivery_id  # the same id: de-duplicable
    assert signing.verify(secret, timestamp=headers["x-autosession-timestamp"],
                          body=got["raw"], signature=headers["x-autosession-signature"])
    done = http.get("/admin/api/deliveries", headers=auth).get_json()["items"]
    assert {d["delivery_id"]: d["status"] for d in done}[delivery_id] == "delivered"
    assert http.get("/admin/api/deliveries?status=failed", headers=auth).get_json()[
        "items"] == []

    # Audited in the session's chain, the operator as actor, the chain still whole.
    with rt.database.read() as db:
        pk = db.execute(select(Session.id).where(Session.session_id == session.session_id)
                        ).scalar_one()
        last = db.execute(select(Operation).where(Operation.session_pk == pk)
                          .order_by(Operation.id.desc()).limit(1)).scalar_one()
        assert check_chain(db, pk).intact
    assert (last.operation, last.actor, last.reason) == (
        "redeliver", f"client:{admin.client_id}", "receiver fixed")
    assert last.details["delivery_id"] == delivery_id

    # Only a given-up delivery is sent again; an unknown one is 404.
    again = http.post(f"/admin/api/deliveries/{delivery_id}/redeliver", headers=auth)
    assert again.status_code == 409 and again.get_json()["delivery_status"] == "delivered"
    assert http.post("/admin/api/deliveries/dlv_nope/redeliver",
                     headers=auth).status_code == 404
    bot = ClientService(rt.database).create(name="a-bot", role="bot")
    assert http.post(f"/admin/api/deliveries/{delivery_id}/redeliver",
                     headers={"Authorization": f"Bearer {bot.token}"}).status_code == 403


def test_a_delivery_whose_event_was_purged_cannot_be_redelivered(rt):
    http = create_app(rt, TESTING=True).test_client()
    admin = ClientService(rt.database).create(name="ops", role="admin")
    auth = {"Authorization": f"Bearer {admin.token}"}
    with WebhookReceiver() as receiver:
        make_client(rt, "bot-a", "bot")
        subscribe(rt, "bot-a", receiver.url)
        receiver.fail_first["session.activated"] = 99
        session = create(rt, "bot-a")
        rt.sessions.complete(session.session_id, actor="bot-a")
        drain(rt, lambda: len(receiver.received) == 1)
    (failed,) = http.get("/admin/api/deliveries?status=failed", headers=auth).get_json()[
        "items"]
    with rt.database.engine.begin() as conn:  # as the retention purge would
        conn.execute(delete(Event).where(Event.id == failed["event_id"]))
    refused = http.post(f"/admin/api/deliveries/{failed['delivery_id']}/redeliver",
                        headers=auth)
    assert refused.status_code == 409 and refused.get_json()["event_id"] == failed["event_id"]
    assert http.get("/admin/api/deliveries?status=failed", headers=auth).get_json()[
        "items"][0]["status"] == "failed"


def test_the_console_lists_given_up_deliveries_and_redelivers_in_both_languages(rt):
    http = create_app(rt, TESTING=True).test_client()
    admin = ClientService(rt.database).create(name="ops", role="admin")
    with WebhookReceiver() as receiver:
        make_client(rt, "bot-a", "bot")
        subscribe(rt, "bot-a", receiver.url)
        receiver.fail_first["session.activated"] = 99
        session = create(rt, "bot-a")
        rt.sessions.complete(session.session_id, actor="bot-a")
        drain(rt, lambda: len(receiver.received) == 1)
        csrf = log_in(http, admin.token)
        english = http.get("/admin/deliveries").get_data(as_text=True)
        assert "Given-up webhook deliveries" in english and "Redeliver" in english
        assert session.session_id in english and 'data-nav="deliveries"' in english
        http.get("/admin/lang/zh?next=/admin/deliveries")
        chinese = http.get("/admin/deliveries").get_data(as_text=True)
        assert "已放弃的 Webhook 推送" in chinese and "重新推送" in chinese
        with rt.database.read() as db:
            from app.delivery.service import delivery_log

            (failed,) = delivery_log(db, status="failed")
        url = f"/admin/deliveries/{failed['delivery_id']}/redeliver"
        assert http.post(url, data={}).status_code == 403  # no CSRF token
        receiver.fail_first.clear()
        posted = http.post(url, data={"csrf_token": csrf})
        assert posted.status_code == 302
        drain(rt, lambda: len(receiver.received) == 2)
    after = http.get(posted.headers["Location"]).get_data(as_text=True)
    assert failed["delivery_id"] in after and "已重新推送" in after
    with rt.database.read() as db:
        ops = db.execute(select(Operation.operation, Operation.actor)
                         .where(Operation.session_id == session.session_id)
                         .order_by(Operation.id)).all()
    assert ops[-1] == ("redeliver", f"client:{admin.client_id}")
