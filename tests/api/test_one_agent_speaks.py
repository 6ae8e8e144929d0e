"""SPEC §12 one agent speaks: once a transfer is accepted only its assignee's human
messages are accepted; reassignment moves that right (audited, `transfer.reassigned`),
and the routing's capacity counts follow it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from app.events.models import Event
from app.messages.models import Message
from tests.api.test_hand_back_api import transferred
from tests.sessions.helpers import audit_rows


def say(caller, sid: str, text: str, *, agent: str | None = None,  # type: ignore[no-untyped-def]
        header: str | None = None, role: str = "human") -> Any:
    body: dict[str, Any] = {"messages": [{"content": text, "sender_role": role}]}
    if agent is not None:
        body["agent_id"] = agent
    return caller.post(f"/api/v1/sessions/{sid}/messages", body,
                       headers={"X-Agent-Id": header} if header is not None else None)


def test_only_the_assignee_speaks_after_an_accept(bot, desk, admin, runtime):
    sid, transfer = transferred(bot, desk, accept=None)
    # before an accept anyone at the desk may answer (naming an agent or not)
    assert say(desk, sid, "hello, a person here").status_code == 200
    desk.post(f"/api/v1/transfers/{transfer['transfer_id']}/accept", {"agent_id": "a1"})

    nameless = say(desk, sid, "who am I?")
    assert nameless.status_code == 422
    assert [e["field"] for e in nameless.get_json()["errors"]] == ["agent_id"]
    other = say(desk, sid, "let me help", agent="a2")
    assert other.status_code == 409
    assert other.get_json()["type"] == "/problems/not-assignee"
    assert other.get_json()["agent_id"] == "a1"
    assert say(desk, sid, "sorry", header="a2").status_code == 409

    assert say(desk, sid, "I am on it", agent="a1").status_code == 200
    assert say(desk, sid, "still me", header="a1").status_code == 200
    assert say(desk, sid, "same agent both ways", agent="a1", header="a1").status_code == 200
    mixed = say(desk, sid, "two names", agent="a1", header="a2")
    assert mixed.status_code == 422 and mixed.get_json()["errors"][0]["field"] == "agent_id"
    # counterpart relays are not the agent speaking
    assert say(desk, sid, "customer says hi", role="counterpart").status_code == 200
    # admins post as operator when they name nobody, and are checked when they do
    assert say(admin, sid, "operator note").status_code == 200
    assert say(admin, sid, "as someone else", agent="a3").status_code == 409
    # bots name no agent (and never post human messages)
    assert say(bot, sid, "robot", agent="a1", role="robot").status_code == 422
    bad = [say(desk, sid, "x", agent=value).status_code for value in ("", " a1", "a" * 65)]
    assert bad == [422, 422, 422]

    with runtime.database.read() as db:
        rows = db.execute(select(Message.content, Message.agent_id, Message.sender_role)
                          .where(Message.sender_role == "human").order_by(Message.id)).all()
    assert [(r.content, r.agent_id) for r in rows] == [
        ("hello, a person here", None), ("I am on it", "a1"), ("still me", "a1"),
        ("same agent both ways", "a1"), ("operator note", None)]


def test_reassign_moves_the_right_to_speak_and_is_audited(bot, desk, runtime):
    sid, transfer = transferred(bot, desk)
    url = f"/api/v1/transfers/{transfer['transfer_id']}/reassign"
    moved = desk.post(url, {"agent_id": "a2", "reason": "a1 does not answer"})
    assert moved.status_code == 200, moved.get_json()
    assert (moved.get_json()["agent_id"], moved.get_json()["status"]) == ("a2", "ACCEPTED")
    assert bot.get(f"/api/v1/sessions/{sid}").status_code == 200
    assert desk.get(f"/api/v1/sessions/{sid}").get_json()["assigned_agent_id"] == "a2"
    assert say(desk, sid, "late reply", agent="a1").status_code == 409
    assert say(desk, sid, "hi, a2 here", agent="a2").status_code == 200

    row = audit_rows(runtime, sid)[-1]
    assert (row.operation, row.reason, row.actor) == (
        "transfer-reassign", "a1 does not answer", f"client:{desk.client_id}")
    assert row.details["from_agent_id"] == "a1" and row.details["agent_id"] == "a2"
    with runtime.database.read() as db:
        event = db.execute(select(Event).where(Event.type == "transfer.reassigned")).scalar_one()
    assert event.audience == "desk" and event.data["agent_id"] == "a2"
    assert event.data["from_agent_id"] == "a1"
    # naming the assignee again changes nothing (a retry is harmless)
    assert desk.post(url, {"agent_id": "a2"}).status_code == 200
    assert len([r for r in audit_rows(runtime, sid) if r.operation == "transfer-reassign"]) == 1


def test_capacity_counts_follow_a_reassignment(bot, desk):
    for agent in ("a1", "a2"):
        desk.put(f"/api/v1/agents/{agent}", {"presence": "online", "max_concurrent": 1,
                                              "skills": ["negotiation"]})
    desk.put("/api/v1/agents/a3", {"presence": "offline"})
    sid, transfer = transferred(bot, desk, shop="s1")

    def load(agent: str) -> int:
        return int(desk.get(f"/api/v1/agents/{agent}").get_json()["load"])

    assert (load("a1"), load("a2")) == (1, 0)
    desk.post(f"/api/v1/transfers/{transfer['transfer_id']}/reassign", {"agent_id": "a2"})
    assert (load("a1"), load("a2")) == (0, 1)
    # routing now sees a1 free and a2 full: the next transfer is offered to a1
    _, second = transferred(bot, desk, shop="s2", accept=None)
    assert second["offered_agent_id"] == "a1"
    assert (load("a1"), load("a2")) == (1, 1)
    # a PENDING offer is reassigned too: the offer (and its load) moves
    moved = desk.post(f"/api/v1/transfers/{second['transfer_id']}/reassign",
                      {"agent_id": "a3"}).get_json()
    assert (moved["status"], moved["offered_agent_id"], moved["agent_id"]) == (
        "PENDING", "a3", None)
    assert (load("a1"), load("a3")) == (0, 1)
    assert sid


def test_reassign_refusals(bot, desk, admin):
    sid, transfer = transferred(bot, desk)
    url = f"/api/v1/transfers/{transfer['transfer_id']}/reassign"
    assert bot.post(url, {"agent_id": "a2"}).status_code == 403
    assert desk.post("/api/v1/transfers/trf_nope/reassign", {"agent_id": "a2"}).status_code == 404
    for body in ({}, {"agent_id": ""}, {"agent_id": "x" * 65}, {"agent_id": "a\ud800"},
                 {"agent_id": "a2", "reason": "r" * 2001}, {"agent_id": "a2", "extra": 1}):
        response = desk.http.post(url, data=_raw(body), content_type="application/json",
                                  headers=desk.headers())
        assert response.status_code == 422, body
    assert admin.post(f"/api/v1/sessions/{sid}/complete").status_code == 200
    ended = desk.post(url, {"agent_id": "a2"})
    assert ended.status_code == 409 and ended.get_json()["current_status"] == "COMPLETED"


def _raw(value: Any) -> bytes:
    import json

    return json.dumps(value, ensure_ascii=True).encode()
