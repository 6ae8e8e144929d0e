"""Sessions over HTTP: create, read, list, transitions and every conflict case of SPEC §3.5."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select

from app.sessions.models import Session


def count_sessions(runtime) -> int:  # type: ignore[no-untyped-def]
    with runtime.database.read() as db:
        return db.execute(select(func.count()).select_from(Session)).scalar_one()


def test_create_answers_201_with_the_spec_fields(bot):
    body = bot.create("auto_bargain", shop=12345, task_type="NEGOTIATION", context={"sku": "x"})
    for name in ("session_id", "account_id", "shop_id", "session_type", "task_type", "priority",
                 "status", "owner_id", "created_at", "activated_at", "ended_at",
                 "last_activity_at", "origin"):
        assert name in body
    assert body["shop_id"] == "12345"
    assert (body["status"], body["session_type"], body["priority"]) == ("ACTIVE", "AUTO_BARGAIN", 3)
    assert body["client_id"] == bot.client_id and body["owner_id"] == bot.client_id
    assert body["context"] == {"sku": "x"} and body["preempted"] == []


def test_user_id_alias_is_accepted(bot):
    response = bot.post("/api/v1/sessions", {"user_id": "u1", "shop_id": "s",
                                             "session_type": "AUTO_FOLLOW_UP"})
    assert response.status_code == 201 and response.get_json()["account_id"] == "u1"


def test_invalid_body_is_422_naming_each_field(bot, runtime):
    response = bot.post("/api/v1/sessions", {"shop_id": "", "session_type": "ROBOT",
                                             "priority": 9, "colour": "red"})
    assert response.status_code == 422
    problem = response.get_json()
    assert response.mimetype == "application/problem+json"
    fields = {e["field"] for e in problem["errors"]}
    assert {"account_id", "shop_id", "session_type", "priority", "colour"} <= fields
    assert count_sessions(runtime) == 0


def test_body_that_is_not_json_is_422(bot):
    response = bot.http.post("/api/v1/sessions", data="{not json",
                             headers=bot.headers({"Content-Type": "application/json"}))
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["field"] == "body"


def test_bots_create_only_robot_types_and_desk_only_human_types(bot, desk, admin):
    assert bot.create("MANUAL_CUSTOMER_SERVICE", expect=403)["type"] == "/problems/forbidden"
    assert desk.create("AUTO_BARGAIN", expect=403)["status"] == 403
    admin.create("AUTO_BARGAIN", shop="a")
    admin.create("MANUAL_URGENT", shop="b")


def test_get_by_owner_desk_and_admin(bot, desk, admin):
    robot = bot.create("AUTO_BARGAIN")
    human = desk.create("MANUAL_COMPLAINT", shop="other")
    assert bot.get(f"/api/v1/sessions/{robot['session_id']}").status_code == 200
    assert admin.get(f"/api/v1/sessions/{robot['session_id']}").status_code == 200
    # the desk sees human sessions, and robot ones only once they were handed over
    assert desk.get(f"/api/v1/sessions/{human['session_id']}").status_code == 200
    assert desk.get(f"/api/v1/sessions/{robot['session_id']}").status_code == 404
    bot.post(f"/api/v1/sessions/{robot['session_id']}/transfer", {"reason": "wants a person"})
    assert desk.get(f"/api/v1/sessions/{robot['session_id']}").get_json()["status"] == (
        "TRANSFERRED")


def test_list_filters_are_case_insensitive_and_pages_by_keyset(bot, admin):
    for i in range(5):
        bot.create("AUTO_BARGAIN", shop=f"s{i}")
    bot.create("AUTO_FOLLOW_UP", shop="s0")  # waits behind s0's bargain
    page = bot.get("/api/v1/sessions", limit=2).get_json()
    seen = [s["session_id"] for s in page["items"]]
    while page["next"]:
        page = bot.get("/api/v1/sessions", limit=2, after=page["next"]).get_json()
        seen += [s["session_id"] for s in page["items"]]
    assert len(seen) == len(set(seen)) == 6
    pending = bot.get("/api/v1/sessions", status="pending").get_json()["items"]
    assert [s["session_type"] for s in pending] == ["AUTO_FOLLOW_UP"]
    by_type = bot.get("/api/v1/sessions", session_type="auto_bargain", shop_id="s3").get_json()
    assert len(by_type["items"]) == 1 and by_type["next"] is None
    assert len(bot.get("/api/v1/sessions", account_id="acc-1").get_json()["items"]) == 6
    assert len(bot.get("/api/v1/sessions", owner_id=bot.client_id).get_json()["items"]) == 6
    assert bot.get("/api/v1/sessions", status="sleeping").status_code == 422
    assert bot.get("/api/v1/sessions", after="garbage!").status_code == 422
    assert admin.get("/api/v1/sessions").get_json()["items"][0]["session_type"] == (
        "AUTO_FOLLOW_UP")


def test_heartbeat_keeps_alive_and_answers_status(bot):
    session = bot.create("AUTO_BARGAIN")
    response = bot.post(f"/api/v1/sessions/{session['session_id']}/heartbeat")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ACTIVE"
    assert response.get_json()["deadline_at"] >= session["deadline_at"]


def test_transitions_and_409_on_an_invalid_one(bot):
    sid = bot.create("AUTO_BARGAIN")["session_id"]
    assert bot.post(f"/api/v1/sessions/{sid}/pause", {"reason": "lunch"}).get_json()["status"] == (
        "PAUSED")
    assert bot.post(f"/api/v1/sessions/{sid}/resume").get_json()["status"] == "ACTIVE"
    done = bot.post(f"/api/v1/sessions/{sid}/complete", {"result": {"deal": 12.5}})
    assert done.get_json()["status"] == "COMPLETED" and done.get_json()["result"] == {"deal": 12.5}
    again = bot.post(f"/api/v1/sessions/{sid}/cancel")
    assert again.status_code == 409
    problem = again.get_json()
    assert problem["type"] == "/problems/invalid-transition"
    assert problem["current_status"] == "COMPLETED" and problem["allowed"] == []


def test_case1_human_preempts_robot_which_waits_and_comes_back(bot, desk):
    robot = bot.create("AUTO_BARGAIN")
    human = desk.create("MANUAL_CUSTOMER_SERVICE", owner_id="agent-7")
    assert human["status"] == "ACTIVE" and human["preempted"] == [robot["session_id"]]
    paused = bot.get(f"/api/v1/sessions/{robot['session_id']}").get_json()
    assert (paused["status"], paused["pause_cause"]) == ("PAUSED", "preempted")
    # the paused robot may not talk over the human
    talk = bot.post(f"/api/v1/sessions/{robot['session_id']}/messages",
                    {"messages": [{"content": "still there?"}]})
    assert talk.status_code == 409
    desk.post(f"/api/v1/sessions/{human['session_id']}/complete")
    assert bot.get(f"/api/v1/sessions/{robot['session_id']}").get_json()["status"] == "ACTIVE"


def test_case2_robot_waits_pending_or_is_rejected_with_the_occupant(bot, desk, runtime):
    human = desk.create("MANUAL_COMPLAINT")
    assert bot.create("AUTO_FOLLOW_UP")["status"] == "PENDING"
    before = count_sessions(runtime)
    rejected = bot.create("AUTO_BARGAIN", on_conflict="REJECT", expect=409)
    assert rejected["type"] == "/problems/slot-occupied"
    # a bot may not read the desk's session: it learns only what SPEC §3.5 allows
    assert rejected["occupant"] == {key: human[key] for key in
                                    ("status", "session_type", "priority", "created_at")}
    assert human["session_id"] not in rejected["detail"]
    assert count_sessions(runtime) == before


def test_reject_describes_the_occupant_in_full_to_a_caller_who_may_read_it(bot, desk):
    """The desk may read human sessions, and a bot its own: their 409 shows the whole view."""
    human = desk.create("MANUAL_COMPLAINT")
    again = desk.create("MANUAL_CUSTOMER_SERVICE", on_conflict="reject", expect=409)
    assert again["occupant"]["session_id"] == human["session_id"]
    desk.post(f"/api/v1/sessions/{human['session_id']}/complete")
    mine = bot.create("AUTO_BARGAIN")
    own = bot.create("AUTO_FOLLOW_UP", on_conflict="reject", expect=409)
    assert own["occupant"]["session_id"] == mine["session_id"]


def test_case3_robot_vs_robot_higher_precedence_runs(bot, other_bot):
    follow = other_bot.create("AUTO_FOLLOW_UP")
    bargain = bot.create("AUTO_BARGAIN")
    assert bargain["status"] == "ACTIVE" and bargain["preempted"] == [follow["session_id"]]
    assert other_bot.get(f"/api/v1/sessions/{follow['session_id']}").get_json()["status"] == (
        "PAUSED")
    late = other_bot.create("AUTO_FOLLOW_UP")
    assert late["status"] == "PENDING"


def test_case4_urgent_takeover_cancels_a_transferred_session(bot, desk):
    robot = bot.create("AUTO_BARGAIN")
    transfer = bot.post(f"/api/v1/sessions/{robot['session_id']}/transfer",
                        {"reason": "refund", "urgency": 2}).get_json()
    urgent = desk.create("MANUAL_URGENT", reason="legal threat")
    assert urgent["interrupted_session_id"] == robot["session_id"]
    interrupted = desk.get(f"/api/v1/sessions/{robot['session_id']}").get_json()
    assert (interrupted["status"], interrupted["end_reason"]) == ("CANCELLED", "interrupted")
    assert desk.get(f"/api/v1/transfers/{transfer['transfer_id']}").get_json()["status"] == (
        "CANCELLED")


def test_case5_network_cut_retry_with_idempotency_key_creates_once(bot, runtime):
    body = {"account_id": "acc-1", "shop_id": "shop-1", "session_type": "AUTO_BARGAIN"}
    first = bot.post("/api/v1/sessions", body, headers={"Idempotency-Key": "k-1"})
    # the answer was "lost": the bot retries the very same request
    retry = bot.post("/api/v1/sessions", body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == retry.status_code == 201
    assert retry.get_json() == first.get_json()
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert count_sessions(runtime) == 1
    # ... then re-checks its sessions and heartbeats
    listed = bot.get("/api/v1/sessions").get_json()["items"]
    assert [s["session_id"] for s in listed] == [first.get_json()["session_id"]]
    assert bot.post(f"/api/v1/sessions/{listed[0]['session_id']}/heartbeat").status_code == 200


def test_case6_robot_transfers_to_a_human_who_completes(bot, desk):
    sid = bot.create("AUTO_BARGAIN", task_type="negotiation")["session_id"]
    response = bot.post(f"/api/v1/sessions/{sid}/transfer", {
        "reason": "customer asks for a person", "urgency": 2, "trigger": "ROBOT_REQUEST",
        "task_state": {"offer": 10}, "customer_info": {"vip": True}, "suggestion": "offer 8",
    })
    assert response.status_code == 201
    transfer = response.get_json()
    for name in ("transfer_id", "session_id", "status", "urgency", "reason", "trigger",
                 "agent_id", "created_at", "accepted_at"):
        assert name in transfer
    assert (transfer["status"], transfer["trigger"]) == ("PENDING", "robot_request")
    # the robot is told to leave: it can no longer act on the session
    assert bot.post(f"/api/v1/sessions/{sid}/complete").get_json()["type"] == (
        "/problems/not-in-control")
    assert bot.post(f"/api/v1/sessions/{sid}/heartbeat").get_json()["status"] == "TRANSFERRED"
    accepted = desk.post(f"/api/v1/transfers/{transfer['transfer_id']}/accept",
                         {"agent_id": "agent-1"})
    assert accepted.status_code == 200 and accepted.get_json()["agent_id"] == "agent-1"
    assert desk.post(f"/api/v1/sessions/{sid}/complete").get_json()["status"] == "COMPLETED"
    assert desk.get(f"/api/v1/transfers/{transfer['transfer_id']}").get_json()["status"] == (
        "COMPLETED")


def test_desk_operator_transfer_defaults_to_operator_trigger(desk):
    sid = desk.create("MANUAL_CUSTOMER_SERVICE")["session_id"]
    transfer = desk.post(f"/api/v1/sessions/{sid}/transfer", {"reason": "escalate"}).get_json()
    assert transfer["trigger"] == "operator"


def test_admin_drives_any_transition_but_does_not_talk_over_a_robot(bot, admin):
    sid = bot.create("AUTO_BARGAIN")["session_id"]
    talk = admin.post(f"/api/v1/sessions/{sid}/messages", {"messages": [{"content": "hi"}]})
    assert talk.status_code == 409 and talk.get_json()["type"] == "/problems/not-in-control"
    assert admin.post(f"/api/v1/sessions/{sid}/pause").get_json()["status"] == "PAUSED"
    assert admin.post(f"/api/v1/sessions/{sid}/cancel").get_json()["status"] == "CANCELLED"


def test_a_heartbeat_moves_the_deadline_as_the_rules_say_for_every_live_status(
        bot, desk, runtime):
    """The heartbeat's one-statement path computes the deadline in SQL; it must agree
    with `deadline_after` for a robot ACTIVE, PENDING and PAUSED session, a human one and
    a TRANSFERRED one."""
    from app.sessions.activity import deadline_after

    active = bot.create("AUTO_BARGAIN", shop="hb")
    pending = bot.create("AUTO_FOLLOW_UP", shop="hb")
    paused = bot.create("AUTO_FOLLOW_UP", shop="hb2")
    bot.post(f"/api/v1/sessions/{paused['session_id']}/pause")
    human = desk.create("MANUAL_CUSTOMER_SERVICE", shop="hb3")
    moved = bot.create("AUTO_BARGAIN", shop="hb4")
    bot.post(f"/api/v1/sessions/{moved['session_id']}/transfer", {"reason": "help"})
    for caller, session in ((bot, active), (bot, pending), (bot, paused), (desk, human),
                            (desk, moved)):
        beat = caller.post(f"/api/v1/sessions/{session['session_id']}/heartbeat")
        assert beat.status_code == 200
        view = beat.get_json()
        with runtime.database.read() as db:
            stored = db.execute(select(Session).where(
                Session.session_id == session["session_id"])).scalar_one()
        assert stored.last_activity_at > datetime.fromisoformat(session["last_activity_at"])
        assert stored.deadline_at == deadline_after(
            runtime.settings, stored, stored.last_activity_at), view["status"]
    # the bot's heartbeat on its session now with the desk changes nothing
    before = runtime.sessions.get(moved["session_id"])
    assert bot.post(f"/api/v1/sessions/{moved['session_id']}/heartbeat").get_json()[
        "status"] == "TRANSFERRED"
    assert runtime.sessions.get(moved["session_id"]).last_activity_at == before.last_activity_at
