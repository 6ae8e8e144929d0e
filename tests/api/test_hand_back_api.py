"""SPEC §12 hand-back: the desk gives a TRANSFERRED session back in one slot transaction;
with `needs_robot` the bot's new robot session takes the slot with the packet."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from app.events.models import Event
from app.manager import AutoSessionManager
from app.transfers.models import Transfer
from tests.api.test_events_api import drain
from tests.sessions.helpers import audit_rows
from tests.sessions.invariants import check_final_state

DEEP: Any = 1
for _ in range(40):
    DEEP = [DEEP]
PACKET = {"summary": "客户要求退款，已同意退 12 元", "outcome": "needs_robot",
          "next_action": "confirm the refund and follow the order",
          "context": {"refund": 12, "order": "o-1", "notes": ["vip", "老客户"]}}


def transferred(bot, desk, *, shop: str = "shop-1", accept: str | None = "a1",  # type: ignore[no-untyped-def]
                session_type: str = "AUTO_BARGAIN", **fields: Any) -> tuple[str, dict]:
    sid = bot.create(session_type, shop=shop, task_type="negotiation", **fields)["session_id"]
    response = bot.post(f"/api/v1/sessions/{sid}/transfer", {"reason": "wants a refund"})
    assert response.status_code == 201, response.get_json()
    transfer = response.get_json()
    if accept:
        accepted = desk.post(f"/api/v1/transfers/{transfer['transfer_id']}/accept",
                             {"agent_id": accept})
        assert accepted.status_code == 200, accepted.get_json()
    return sid, transfer


def transfer_row(runtime, transfer_id: str) -> Transfer:  # type: ignore[no-untyped-def]
    with runtime.database.read() as db:
        return db.execute(select(Transfer).where(Transfer.transfer_id == transfer_id)
                          ).scalar_one()


def test_needs_robot_completes_the_session_and_opens_the_bots_new_one(bot, desk, runtime):
    sid, transfer = transferred(bot, desk, priority=3)
    response = desk.post(f"/api/v1/sessions/{sid}/hand-back", PACKET,
                         headers={"X-Agent-Id": "a1"})
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    completed, resumed = body["completed"], body["resumed"]
    assert completed["session_id"] == sid and completed["status"] == "COMPLETED"
    assert completed["handed_back_to"] == resumed["session_id"]
    assert resumed["status"] == "ACTIVE" and resumed["handed_back_from"] == sid
    assert (resumed["session_type"], resumed["task_type"], resumed["priority"]) == (
        "AUTO_BARGAIN", "negotiation", 3)
    assert resumed["client_id"] == bot.client_id and resumed["owner_id"] == bot.client_id
    assert resumed["context"] == {k: PACKET[k] for k in
                                  ("summary", "outcome", "next_action", "context")}
    # the bot owns the new session: it reads it, and talks on it
    assert bot.get(f"/api/v1/sessions/{resumed['session_id']}").status_code == 200
    posted = bot.post(f"/api/v1/sessions/{resumed['session_id']}/messages",
                      {"messages": [{"content": "退款已确认"}]})
    assert posted.status_code == 200, posted.get_json()
    row = transfer_row(runtime, transfer["transfer_id"])
    assert row.status == "COMPLETED" and row.ended_at is not None
    assert row.hand_back["summary"] == PACKET["summary"]
    # the bot learns it from its feed, with the packet
    events, _ = drain(bot, limit=50)
    handed = [e for e in events if e["type"] == "session.handed_back"]
    assert len(handed) == 1 and handed[0]["session_id"] == sid
    data = handed[0]["data"]
    assert data["resumed_session_id"] == resumed["session_id"]
    assert data["context"] == PACKET["context"] and data["outcome"] == "needs_robot"
    assert data["agent_id"] == "a1"
    assert {"session.activated"} <= {e["type"] for e in events
                                     if e["session_id"] == resumed["session_id"]}
    assert [r.operation for r in audit_rows(runtime, sid)][-1] == "hand-back"
    assert [r.operation for r in audit_rows(runtime, resumed["session_id"])] == [
        "create", "activate"]
    assert check_final_state(runtime) == []


def test_resolved_hand_back_frees_the_slot_for_the_next_in_line(bot, other_bot, desk, runtime):
    sid, transfer = transferred(bot, desk)
    waiting = other_bot.create("AUTO_FOLLOW_UP")
    assert waiting["status"] == "PENDING"
    response = desk.post(f"/api/v1/sessions/{sid}/hand-back",
                         {"summary": "done", "outcome": "RESOLVED", "agent_id": "a1"})
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["resumed"] is None
    assert response.get_json()["completed"]["handed_back_to"] is None
    assert other_bot.get(f"/api/v1/sessions/{waiting['session_id']}").get_json()[
        "status"] == "ACTIVE"
    assert transfer_row(runtime, transfer["transfer_id"]).status == "COMPLETED"
    # a second hand-back, or one on a session that is not TRANSFERRED, is a 409
    again = desk.post(f"/api/v1/sessions/{sid}/hand-back", {"summary": "x", "outcome": "resolved"})
    assert again.status_code == 409
    assert again.get_json()["type"] == "/problems/invalid-transition"
    assert again.get_json()["current_status"] == "COMPLETED"
    assert check_final_state(runtime) == []


def test_hand_back_of_an_unaccepted_transfer_cancels_the_offer(bot, desk, runtime):
    sid, transfer = transferred(bot, desk, accept=None)
    response = desk.post(f"/api/v1/sessions/{sid}/hand-back",
                         {"summary": "the robot can do this", "outcome": "needs_robot"})
    assert response.status_code == 201
    assert transfer_row(runtime, transfer["transfer_id"]).status == "CANCELLED"
    assert response.get_json()["resumed"]["status"] == "ACTIVE"


def test_a_waiting_human_outranks_the_resumed_robot(bot, desk, runtime):
    sid, _ = transferred(bot, desk)
    human = desk.create("MANUAL_CUSTOMER_SERVICE", owner_id="a7")
    assert human["status"] == "PENDING"  # a TRANSFERRED occupant has human precedence
    body = desk.post(f"/api/v1/sessions/{sid}/hand-back", PACKET).get_json()
    resumed = bot.get(f"/api/v1/sessions/{body['resumed']['session_id']}").get_json()
    assert resumed["status"] == "PAUSED" and resumed["pause_cause"] == "preempted"
    assert resumed["preempted_by"] == human["session_id"]
    assert desk.get(f"/api/v1/sessions/{human['session_id']}").get_json()["status"] == "ACTIVE"
    assert check_final_state(runtime) == []


def test_hand_back_refusals(bot, desk, admin, runtime):
    active = bot.create("AUTO_BARGAIN", shop="s-active")["session_id"]
    # a robot session never handed to the desk is not the desk's to see
    assert desk.post(f"/api/v1/sessions/{active}/hand-back", PACKET).status_code == 404
    not_transferred = admin.post(f"/api/v1/sessions/{active}/hand-back", PACKET)
    assert not_transferred.status_code == 409
    assert not_transferred.get_json()["current_status"] == "ACTIVE"
    desk_session = desk.create("MANUAL_CUSTOMER_SERVICE", shop="s-desk")["session_id"]
    assert desk.post(f"/api/v1/sessions/{desk_session}/hand-back",
                     {**PACKET, "outcome": "resolved"}).status_code == 409
    sid, _ = transferred(bot, desk)
    assert bot.post(f"/api/v1/sessions/{sid}/hand-back", PACKET).status_code == 403
    assert desk.post("/api/v1/sessions/ses_nope/hand-back", PACKET).status_code == 404
    other_agent = desk.post(f"/api/v1/sessions/{sid}/hand-back", {**PACKET, "agent_id": "a2"})
    assert other_agent.status_code == 409
    assert other_agent.get_json()["type"] == "/problems/not-assignee"
    assert other_agent.get_json()["agent_id"] == "a1"
    # a human session has no robot to hand back to
    human = desk.create("MANUAL_CUSTOMER_SERVICE", shop="s-human")["session_id"]
    assert desk.post(f"/api/v1/sessions/{human}/transfer",
                     {"reason": "second opinion"}).status_code == 201
    no_robot = desk.post(f"/api/v1/sessions/{human}/hand-back", PACKET)
    assert no_robot.status_code == 409 and "no robot" in no_robot.get_json()["detail"]
    assert desk.post(f"/api/v1/sessions/{human}/hand-back",
                     {**PACKET, "outcome": "resolved"}).status_code == 201
    assert bot.get(f"/api/v1/sessions/{sid}").get_json()["status"] == "TRANSFERRED"


@pytest.mark.parametrize(("change", "field"), [
    ({"context": {"note": "\ud800"}}, "context"),
    ({"summary": "lone \udfff"}, "summary"),
    ({"context": {"blob": "x" * 70_000}}, "context"),
    ({"summary": "s" * 4000, "next_action": "n" * 2000,
      "context": {"blob": "x" * 60_000}}, "context"),  # the packet as a whole is too big
    ({"context": {"a": DEEP}}, "context"),
    ({"context": {"n": 2**70}}, "context"),
    ({"context": ["not", "an", "object"]}, "context"),
    ({"outcome": "maybe"}, "outcome"),
    ({"summary": ""}, "summary"),
    ({"agent_id": " a1"}, "agent_id"),
    ({"surprise": 1}, "surprise"),
])
def test_the_packet_is_validated_like_every_free_form_field(
        bot, desk, runtime, change: dict[str, Any], field: str):
    sid, transfer = transferred(bot, desk)
    response = desk.http.post(f"/api/v1/sessions/{sid}/hand-back",
                              data=_json({**PACKET, **change}),
                              content_type="application/json", headers=desk.headers())
    assert response.status_code == 422, response.get_json()
    assert response.mimetype == "application/problem+json"
    assert field in {e["field"].split(".")[0] for e in response.get_json()["errors"]}
    assert bot.get(f"/api/v1/sessions/{sid}").get_json()["status"] == "TRANSFERRED"
    assert transfer_row(runtime, transfer["transfer_id"]).status == "ACCEPTED"
    with runtime.database.read() as db:
        assert db.execute(select(Event.id).where(Event.type == "session.handed_back")
                          ).first() is None


def _json(value: Any) -> bytes:
    """JSON with lone surrogates kept as escapes (what a hostile client sends)."""
    import json

    return json.dumps(value, ensure_ascii=True).encode()


def test_python_api_hands_back_and_reassigns(runtime):
    manager = AutoSessionManager(runtime)
    session = manager.create_robot_session(shop_id=7, user_id="u1", task_type="negotiation")
    transfer = manager.transfer_to_human(session.session_id, reason="refund please")
    manager.accept_transfer(transfer.transfer_id, "a1")
    moved = manager.reassign_transfer(transfer.transfer_id, "a2", reason="a1 went home")
    assert moved.agent_id == "a2"
    outcome = manager.hand_back(session.session_id, "refunded", "needs_robot",
                                next_action="follow up", context={"refund": 1},
                                agent_id="a2")
    assert outcome.completed.status == "COMPLETED"
    assert outcome.resumed is not None and outcome.resumed.status == "ACTIVE"
    assert outcome.resumed.context == {"summary": "refunded", "outcome": "needs_robot",
                                       "next_action": "follow up", "context": {"refund": 1}}
    from app.errors import ValidationFailed

    with pytest.raises(ValidationFailed):
        manager.hand_back(outcome.resumed.session_id, "x", "perhaps")


# ---- Idempotency-Key: a hand-back retried after a lost answer ---------------------------
def resumed_sessions(runtime, sid: str) -> list[str]:  # type: ignore[no-untyped-def]
    from app.sessions.models import Session
    with runtime.database.read() as db:
        return list(db.execute(select(Session.session_id)
                               .where(Session.handed_back_from == sid)).scalars())


def test_a_retried_hand_back_with_its_key_replays_the_first_answer(bot, desk, runtime):
    sid, _ = transferred(bot, desk)
    key = {"X-Agent-Id": "a1", "Idempotency-Key": "hb-1"}
    first = desk.post(f"/api/v1/sessions/{sid}/hand-back", PACKET, headers=key)
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    again = desk.post(f"/api/v1/sessions/{sid}/hand-back", PACKET, headers=key)
    assert again.status_code == 201, again.get_json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json() == first.get_json()
    assert resumed_sessions(runtime, sid) == [first.get_json()["resumed"]["session_id"]]
    events, _ = drain(bot, limit=50)
    assert [e["type"] for e in events].count("session.handed_back") == 1
    # another packet under the same key is a client bug, not a replay
    other = desk.post(f"/api/v1/sessions/{sid}/hand-back", {**PACKET, "summary": "other"},
                      headers=key)
    assert other.status_code == 409
    assert other.get_json()["type"] == "/problems/idempotency-key-reuse"
    # without a key a retry is refused as before: the session is COMPLETED
    bare = desk.post(f"/api/v1/sessions/{sid}/hand-back", PACKET, headers={"X-Agent-Id": "a1"})
    assert bare.status_code == 409 and bare.get_json()["current_status"] == "COMPLETED"


def test_a_failed_hand_back_leaves_its_key_free(bot, desk, runtime):
    sid, _ = transferred(bot, desk)
    key = {"Idempotency-Key": "hb-2"}
    refused = desk.post(f"/api/v1/sessions/{sid}/hand-back", PACKET,
                        headers={**key, "X-Agent-Id": "someone-else"})
    assert refused.status_code == 409
    done = desk.post(f"/api/v1/sessions/{sid}/hand-back", PACKET,
                     headers={**key, "X-Agent-Id": "a1"})
    assert done.status_code == 201 and "Idempotent-Replayed" not in done.headers


def test_racing_retries_of_one_hand_back_hand_it_back_once(app, bot, desk, runtime):
    """Six copies of one request at once: one hands back, the others replay its answer
    (those that reached the session after it was COMPLETED look for the answer again)."""
    import threading
    sid, _ = transferred(bot, desk)
    answers: list[tuple[int, Any]] = []
    barrier = threading.Barrier(6)

    def call() -> None:
        client = app.test_client()
        barrier.wait()
        response = client.post(f"/api/v1/sessions/{sid}/hand-back", json=PACKET,
                               headers=desk.headers({"Idempotency-Key": "race",
                                                     "X-Agent-Id": "a1"}))
        answers.append((response.status_code, response.get_json()))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [code for code, _ in answers] == [201] * 6, answers
    assert len({body["resumed"]["session_id"] for _, body in answers}) == 1
    assert len(resumed_sessions(runtime, sid)) == 1
