"""Agents, routing, the desk queue, and the accept race (exactly one winner)."""

from __future__ import annotations

import threading


def transfer_of(bot, shop: str, urgency: int = 2, **fields) -> dict:  # type: ignore[no-untyped-def]
    sid = bot.create("AUTO_BARGAIN", shop=shop)["session_id"]
    response = bot.post(f"/api/v1/sessions/{sid}/transfer",
                        {"reason": f"help on {shop}", "urgency": urgency, **fields})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_put_agent_creates_then_updates_and_lists(desk, bot):
    created = desk.put("/api/v1/agents/li", {"presence": "ONLINE", "skills": ["Negotiation"],
                                              "max_concurrent": 2, "name": "Li"})
    assert created.status_code == 201
    assert created.get_json()["skills"] == ["negotiation"]
    updated = desk.put("/api/v1/agents/li", {"presence": "offline"})
    assert updated.status_code == 200
    assert (updated.get_json()["presence"], updated.get_json()["max_concurrent"]) == ("offline", 2)
    desk.put("/api/v1/agents/wang", {"presence": "online"})
    everyone = desk.get("/api/v1/agents", limit=1).get_json()
    assert [a["agent_id"] for a in everyone["items"]] == ["li"] and everyone["next"] == "li"
    online = desk.get("/api/v1/agents", presence="Online").get_json()["items"]
    assert [a["agent_id"] for a in online] == ["wang"]
    assert desk.put("/api/v1/agents/x", {"presence": "away"}).status_code == 422
    assert desk.get("/api/v1/agents/nobody").status_code == 404
    assert bot.get("/api/v1/agents").status_code == 403


def test_routing_offers_the_least_loaded_online_agent_with_the_skill(desk, bot):
    desk.put("/api/v1/agents/a1", {"presence": "online", "skills": ["negotiation"]})
    desk.put("/api/v1/agents/a2", {"presence": "online", "skills": ["negotiation"]})
    desk.put("/api/v1/agents/a3", {"presence": "online", "skills": ["complaint"]})
    desk.put("/api/v1/agents/a4", {"presence": "offline", "skills": ["negotiation"]})
    first = transfer_of(bot, "s1")["offered_agent_id"]
    second = transfer_of(bot, "s2")["offered_agent_id"]
    assert {first, second} == {"a1", "a2"}
    assert desk.get(f"/api/v1/agents/{first}").get_json()["load"] == 1
    requested = transfer_of(bot, "s3", agent_id="a4")
    assert requested["offered_agent_id"] == "a4"
    mine = desk.get("/api/v1/transfers", agent_id="a4").get_json()["items"]
    assert [t["transfer_id"] for t in mine] == [requested["transfer_id"]]


def test_queue_is_ordered_by_urgency_then_age_and_paginates(desk, bot):
    low = transfer_of(bot, "s1", urgency=4)
    high = transfer_of(bot, "s2", urgency=1)
    mid_old = transfer_of(bot, "s3", urgency=2)
    mid_new = transfer_of(bot, "s4", urgency=2)
    page = desk.get("/api/v1/transfers", limit=3).get_json()
    rest = desk.get("/api/v1/transfers", limit=3, after=page["next"]).get_json()
    order = [t["transfer_id"] for t in page["items"] + rest["items"]]
    assert order == [high["transfer_id"], mid_old["transfer_id"], mid_new["transfer_id"],
                     low["transfer_id"]]
    assert rest["next"] is None
    desk.post(f"/api/v1/transfers/{high['transfer_id']}/accept", {"agent_id": "a1"})
    pending = desk.get("/api/v1/transfers", status="pending").get_json()["items"]
    assert high["transfer_id"] not in [t["transfer_id"] for t in pending]
    accepted = desk.get("/api/v1/transfers", status="accepted").get_json()["items"]
    assert [t["transfer_id"] for t in accepted] == [high["transfer_id"]]
    assert len(desk.get("/api/v1/transfers", status="ALL").get_json()["items"]) == 4
    assert desk.get("/api/v1/transfers", status="lost").status_code == 422
    assert desk.get("/api/v1/transfers", after="!!").status_code == 422


def test_second_accept_gets_409(desk, admin, bot):
    transfer = transfer_of(bot, "s1")
    url = f"/api/v1/transfers/{transfer['transfer_id']}/accept"
    assert desk.post(url, {"agent_id": "a1"}).status_code == 200
    late = admin.post(url, {"agent_id": "a2"})
    assert late.status_code == 409
    assert late.get_json()["type"] == "/problems/transfer-already-accepted"
    assert late.get_json()["agent_id"] == "a1"
    assert desk.post("/api/v1/transfers/trf_nope/accept", {"agent_id": "a1"}).status_code == 404
    assert desk.post(url, {}).status_code == 422


def test_accept_race_has_exactly_one_winner(app, desk, bot):
    transfer = transfer_of(bot, "s1")
    url = f"/api/v1/transfers/{transfer['transfer_id']}/accept"
    codes: dict[str, int] = {}
    barrier = threading.Barrier(6)

    def accept(agent: str) -> None:
        client = app.test_client()
        barrier.wait()
        response = client.post(url, json={"agent_id": agent}, headers=desk.headers())
        codes[agent] = response.status_code

    threads = [threading.Thread(target=accept, args=(f"agent-{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(codes.values()) == [200, 409, 409, 409, 409, 409]
    winner = next(a for a, c in codes.items() if c == 200)
    assert desk.get(f"/api/v1/transfers/{transfer['transfer_id']}").get_json()["agent_id"] == (
        winner)
    session = desk.get(f"/api/v1/sessions/{transfer['session_id']}").get_json()
    assert session["assigned_agent_id"] == winner
