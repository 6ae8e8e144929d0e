"""The admin API (`/admin/api/...`): every endpoint, admin-only, force actions audited."""

from __future__ import annotations

import io
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from app.agents.service import AgentService, AgentUpdate
from app.audit.models import Operation
from app.db import utcnow
from app.delivery.models import WebhookDelivery
from app.events.models import Event
from app.imports.models import ImportJob, ImportUploadPart
from app.messages.service import LiveMessage
from app.runtime import Runtime
from app.sessions.enums import SenderRole, SessionStatus
from app.sessions.slot import SlotFence
from app.transfers.enums import TransferTrigger
from app.transfers.schemas import TransferRequest
from tests.admin.conftest import Caller

ADMIN_ENDPOINTS: list[tuple[str, str]] = [
    ("GET", "/admin/api/sessions"),
    ("GET", "/admin/api/sessions/ses_x"),
    ("POST", "/admin/api/sessions/ses_x/force-close"),
    ("GET", "/admin/api/sessions/ses_x/audit/verify"),
    ("GET", "/admin/api/audit"),
    ("GET", "/admin/api/audit/verify"),
    ("GET", "/admin/api/slots?account_id=a&shop_id=s"),
    ("POST", "/admin/api/slots/release"),
    ("GET", "/admin/api/transfers"),
    ("GET", "/admin/api/agents"),
    ("GET", "/admin/api/imports"),
    ("POST", "/admin/api/imports"),
    ("GET", "/admin/api/imports/imp_x"),
    ("GET", "/admin/api/imports/imp_x/errors"),
    ("POST", "/admin/api/imports/imp_x/retry"),
    ("GET", "/admin/api/clients"),
    ("POST", "/admin/api/clients"),
    ("POST", "/admin/api/clients/cli_x/revoke"),
    ("POST", "/admin/api/clients/cli_x/rotate"),
    ("GET", "/admin/api/deliveries"),
    ("POST", "/admin/api/deliveries/dlv_x/redeliver"),
    ("GET", "/admin/api/stats"),
]


def audit_rows(runtime: Runtime, session_id: str) -> list[Operation]:
    with runtime.database.read() as db:
        return list(db.execute(
            select(Operation).where(Operation.session_id == session_id).order_by(Operation.id)
        ).scalars())


# ---- who may call ------------------------------------------------------------------------
def test_every_admin_endpoint_refuses_bot_and_desk_clients_with_403(make_caller, http):
    bot, desk = make_caller("bot"), make_caller("desk")
    for method, path in ADMIN_ENDPOINTS:
        for caller in (bot, desk):
            response = http.open(path, method=method, headers=caller.headers(), json={})
            assert response.status_code == 403, (method, path, caller.role)
            assert response.get_json()["type"] == "/problems/forbidden"
        anonymous = http.open(path, method=method, json={})
        assert anonymous.status_code == 401, (method, path)


# ---- sessions ------------------------------------------------------------------------------
def test_search_filters_by_every_field_and_pages_by_keyset(admin: Caller, open_session, runtime):
    first = open_session("AUTO_BARGAIN", "acc-1", "shop-1", owner_id="bot-a")
    waiting = open_session("AUTO_FOLLOW_UP", "acc-1", "shop-1", owner_id="bot-b")
    other = open_session("MANUAL_CUSTOMER_SERVICE", "acc-2", "shop-9", owner_id="agent-7")
    ids = {first.session_id, waiting.session_id, other.session_id}

    def found(**params: Any) -> set[str]:
        response = admin.get("/admin/api/sessions", **params)
        assert response.status_code == 200, response.get_json()
        return {s["session_id"] for s in response.get_json()["items"]}

    assert found() == ids
    assert found(account_id="acc-1") == {first.session_id, waiting.session_id}
    assert found(shop_id="shop-9") == {other.session_id}
    assert found(status="pending") == {waiting.session_id}
    assert found(type="manual_customer_service") == {other.session_id}
    assert found(session_type="AUTO_BARGAIN") == {first.session_id}
    assert found(owner_id="bot-b") == {waiting.session_id}
    assert found(origin="live") == ids
    assert found(origin="import") == set()
    now = utcnow()
    assert found(**{"from": (now - timedelta(minutes=5)).isoformat()}) == ids
    assert found(**{"to": (now - timedelta(minutes=5)).isoformat()}) == set()
    assert found(created_from=(now + timedelta(minutes=5)).isoformat()) == set()

    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["after"] = cursor
        body = admin.get("/admin/api/sessions", **params).get_json()
        seen.extend(s["session_id"] for s in body["items"])
        cursor = body["next"]
        if cursor is None:
            break
    assert len(seen) == 3 and set(seen) == ids

    bad = admin.get("/admin/api/sessions", status="SLEEPING")
    assert bad.status_code == 422
    assert bad.get_json()["errors"][0]["field"] == "status"


def test_session_detail_shows_messages_transfers_and_audit_as_a_timeline(
        admin: Caller, open_session, runtime):
    session = open_session("AUTO_BARGAIN", owner_id="bot-a")
    now = utcnow()
    runtime.sessions.record_messages(session.session_id, [
        LiveMessage(message_id="m1", sender_role=SenderRole.ROBOT, content="您好，价格可以谈",
                    sent_at=now),
        LiveMessage(message_id="m2", sender_role=SenderRole.COUNTERPART, content="多少钱？",
                    sent_at=now + timedelta(seconds=1)),
    ], actor="client:bot")
    transfer = runtime.sessions.transfer(
        session.session_id, TransferRequest(reason="refund", trigger=TransferTrigger.KEYWORD),
        actor="system:detector")

    response = admin.get(f"/admin/api/sessions/{session.session_id}")
    assert response.status_code == 200
    body = response.get_json()
    assert body["session"]["status"] == "TRANSFERRED"
    assert [m["content"] for m in body["messages"]] == ["您好，价格可以谈", "多少钱？"]
    assert [t["transfer_id"] for t in body["transfers"]] == [transfer.transfer_id]
    # live messages are their own record (who posted them, when received): no audit row
    assert [m["posted_by"] for m in body["messages"]] == ["client:bot", "client:bot"]
    assert [a["operation"] for a in body["audit"]] == ["create", "activate", "transfer"]
    kinds = [item["kind"] for item in body["timeline"]]
    assert kinds.count("audit") == 3 and kinds.count("message") == 2 and "transfer" in kinds
    times = [item["at"] for item in body["timeline"]]
    assert times == sorted(times)

    assert admin.get("/admin/api/sessions/ses_missing").status_code == 404


# ---- the slot, force actions --------------------------------------------------------------
def test_slot_view_lists_the_waiting_queue_in_precedence_order(admin: Caller, open_session,
                                                               runtime):
    occupant = open_session("MANUAL_CUSTOMER_SERVICE", owner_id="agent-1")
    follow_up = open_session("AUTO_FOLLOW_UP", owner_id="bot-f")
    bargain = open_session("AUTO_BARGAIN", owner_id="bot-b")
    complaint = open_session("MANUAL_COMPLAINT", owner_id="agent-2")

    body = admin.get("/admin/api/slots", account_id="acc-1", shop_id="shop-1").get_json()
    assert body["occupant"]["session_id"] == occupant.session_id
    assert [w["session_id"] for w in body["waiting"]] == [
        complaint.session_id, bargain.session_id, follow_up.session_id]
    assert [w["position"] for w in body["waiting"]] == [1, 2, 3]
    assert body["waiting"][0]["precedence"]["human"] is True
    with runtime.database.read() as db:
        stored = SlotFence(db, "acc-1", "shop-1").value
    # every change of the slot advanced it (creates that only joined the line may not)
    assert body["fence"] == stored >= 2

    missing = admin.get("/admin/api/slots", account_id="nobody", shop_id="nowhere")
    assert missing.status_code == 404
    assert admin.get("/admin/api/slots", account_id="acc-1").status_code == 422


def test_force_close_cancels_promotes_the_next_and_audits_the_operator(
        admin: Caller, open_session, runtime):
    occupant = open_session("AUTO_BARGAIN", owner_id="bot-b")
    waiting = open_session("AUTO_FOLLOW_UP", owner_id="bot-f")

    response = admin.post(f"/admin/api/sessions/{occupant.session_id}/force-close",
                          {"reason": "bot stuck in a loop"})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["session"]["status"] == "CANCELLED"
    assert body["session"]["end_reason"] == "bot stuck in a loop"
    assert body["promoted"]["session_id"] == waiting.session_id
    assert runtime.sessions.get(waiting.session_id).status == SessionStatus.ACTIVE

    last = audit_rows(runtime, occupant.session_id)[-1]
    assert (last.operation, last.from_status, last.to_status) == ("force-close", "ACTIVE",
                                                                  "CANCELLED")
    assert last.actor == admin.actor
    assert last.details == {"operator": "ops-alice", "forced": True}
    assert last.reason == "bot stuck in a loop"
    promoted = audit_rows(runtime, waiting.session_id)[-1]
    assert (promoted.operation, promoted.to_status) == ("activate", "ACTIVE")

    again = admin.post(f"/admin/api/sessions/{occupant.session_id}/force-close", {})
    assert again.status_code == 409
    assert again.get_json()["type"] == "/problems/invalid-transition"


def test_release_slot_cancels_a_transferred_occupant_and_its_transfer(
        admin: Caller, open_session, runtime):
    occupant = open_session("AUTO_BARGAIN", owner_id="bot-b")
    transfer = runtime.sessions.transfer(
        occupant.session_id, TransferRequest(reason="needs a person"), actor="client:bot")
    waiting = open_session("AUTO_FOLLOW_UP", owner_id="bot-f")

    response = admin.post("/admin/api/slots/release",
                          {"account_id": "acc-1", "shop_id": "shop-1", "reason": "stale"})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["released"]["session_id"] == occupant.session_id
    assert body["released"]["status"] == "CANCELLED"
    assert body["promoted"]["session_id"] == waiting.session_id
    assert runtime.sessions.get_transfer(transfer.transfer_id).status == "CANCELLED"
    last = audit_rows(runtime, occupant.session_id)[-1]
    assert (last.operation, last.actor, last.from_status) == ("release-slot", admin.actor,
                                                              "TRANSFERRED")

    slot = admin.get("/admin/api/slots", account_id="acc-1", shop_id="shop-1").get_json()
    assert slot["occupant"]["session_id"] == waiting.session_id and slot["waiting"] == []

    admin.post(f"/admin/api/sessions/{waiting.session_id}/force-close", {})
    free = admin.post("/admin/api/slots/release", {"account_id": "acc-1", "shop_id": "shop-1"})
    assert free.status_code == 409
    assert admin.post("/admin/api/slots/release", {"account_id": "acc-1"}).status_code == 422


# ---- audit -----------------------------------------------------------------------------------
def test_a_tampered_audit_row_is_detected_by_the_verify_endpoints(
        admin: Caller, open_session, runtime):
    victim = open_session("AUTO_BARGAIN", "acc-1", "shop-1")
    runtime.sessions.pause(victim.session_id, actor="client:bot", reason="lunch")
    runtime.sessions.resume(victim.session_id, actor="client:bot")
    bystander = open_session("AUTO_BARGAIN", "acc-2", "shop-2")

    clean = admin.get(f"/admin/api/sessions/{victim.session_id}/audit/verify").get_json()
    assert clean == {"session_id": victim.session_id, "intact": True,
                     "first_bad_row_id": None, "rows_checked": 4, "head_matches": True}
    assert admin.get("/admin/api/audit/verify").get_json()["intact"] is True

    target = audit_rows(runtime, victim.session_id)[2]  # the pause
    with runtime.database.engine.begin() as conn:
        conn.execute(update(Operation).where(Operation.id == target.id)
                     .values(reason="nothing to see here"))

    broken = admin.get(f"/admin/api/sessions/{victim.session_id}/audit/verify").get_json()
    assert broken["intact"] is False
    assert broken["first_bad_row_id"] == target.id
    assert admin.get(f"/admin/api/sessions/{bystander.session_id}/audit/verify"
                     ).get_json()["intact"] is True

    since = (utcnow() - timedelta(hours=1)).isoformat()
    sweep = admin.get("/admin/api/audit/verify", **{"from": since}).get_json()
    assert sweep["intact"] is False and sweep["sessions_checked"] == 2
    assert sweep["broken"] == [{"session_id": victim.session_id, "first_bad_row_id": target.id,
                                "head_matches": False}]
    sample = admin.get("/admin/api/audit/verify", sample=5).get_json()
    assert sample["sampled"] is True and sample["sessions_checked"] == 2
    assert sample["intact"] is False
    future = admin.get("/admin/api/audit/verify",
                       **{"from": (utcnow() + timedelta(hours=1)).isoformat()}).get_json()
    assert future["sessions_checked"] == 0 and future["intact"] is True


def test_audit_search_filters_by_actor_and_operation(admin: Caller, open_session):
    session = open_session("AUTO_BARGAIN")
    admin.post(f"/admin/api/sessions/{session.session_id}/force-close", {"reason": "x"})
    by_actor = admin.get("/admin/api/audit", actor=admin.actor).get_json()["items"]
    assert [(r["operation"], r["session_id"]) for r in by_actor] == [
        ("force-close", session.session_id)]
    creates = admin.get("/admin/api/audit", operation="create").get_json()["items"]
    assert len(creates) == 1
    page = admin.get("/admin/api/audit", limit=1).get_json()
    assert len(page["items"]) == 1 and page["next"] is not None
    rest = admin.get("/admin/api/audit", after=page["next"]).get_json()["items"]
    assert page["items"][0]["id"] not in {r["id"] for r in rest}


# ---- transfers, agents, deliveries, clients --------------------------------------------------
def test_transfer_queue_and_agents(admin: Caller, open_session, runtime):
    AgentService(runtime.database).upsert(
        "agent-9", AgentUpdate(presence="online", skills=["negotiation"], name="小王"))
    session = open_session("AUTO_BARGAIN")
    runtime.sessions.transfer(session.session_id, TransferRequest(reason="angry", urgency=1),
                              actor="client:bot")
    queue = admin.get("/admin/api/transfers").get_json()["items"]
    assert [(t["session_id"], t["urgency"], t["account_id"]) for t in queue] == [
        (session.session_id, 1, "acc-1")]
    assert queue[0]["age_seconds"] >= 0
    agents = admin.get("/admin/api/agents").get_json()["items"]
    assert [(a["agent_id"], a["presence"], a["name"], a["load"]) for a in agents] == [
        ("agent-9", "online", "小王", 1)]


def test_webhook_deliveries_are_listed_with_their_state(admin: Caller, open_session, runtime):
    session = open_session("AUTO_BARGAIN")
    with runtime.database.unit_of_work() as uow:
        event = uow.session.execute(select(Event).order_by(Event.id.desc()).limit(1)).scalar_one()
        now = utcnow()
        uow.session.add(WebhookDelivery(
            delivery_id="dlv_test", client_id=admin.client_id, event_pk=event.id,
            session_id=session.session_id, event_type=event.type, status="failed",
            attempts=12, next_attempt_at=now, last_error="connection refused",
            created_at=now))
        uow.commit()
    body = admin.get("/admin/api/deliveries", status="failed").get_json()
    assert [(d["delivery_id"], d["attempts"], d["last_error"]) for d in body["items"]] == [
        ("dlv_test", 12, "connection refused")]
    assert body["summary"][0]["failed"] == 1
    assert admin.get("/admin/api/deliveries", status="delivered").get_json()["items"] == []


def test_clients_are_created_rotated_and_revoked(admin: Caller, http):
    created = admin.post("/admin/api/clients", {"name": "bargain-bot", "role": "bot"})
    assert created.status_code == 201
    client = created.get_json()
    assert client["role"] == "bot" and client["token"].startswith(client["token_prefix"])
    old_token = client["token"]
    as_bot = {"Authorization": f"Bearer {old_token}"}
    assert http.get("/api/v1/sessions", headers=as_bot).status_code == 200

    listed = admin.get("/admin/api/clients").get_json()["items"]
    assert {c["name"] for c in listed} == {"ops-alice", "bargain-bot"}
    assert all("token" not in c and "token_hash" not in c for c in listed)

    rotated = admin.post(f"/admin/api/clients/{client['client_id']}/rotate").get_json()
    assert rotated["token"] != old_token
    assert http.get("/api/v1/sessions", headers=as_bot).status_code == 401
    new_bot = {"Authorization": f"Bearer {rotated['token']}"}
    assert http.get("/api/v1/sessions", headers=new_bot).status_code == 200

    revoked = admin.post(f"/admin/api/clients/{client['client_id']}/revoke").get_json()
    assert revoked["active"] is False and revoked["revoked_at"]
    assert http.get("/api/v1/sessions", headers=new_bot).status_code == 401

    assert admin.post("/admin/api/clients", {"name": "x", "role": "root"}).status_code == 422
    assert admin.post("/admin/api/clients/cli_nope/revoke").status_code == 404


# ---- import jobs ----------------------------------------------------------------------------
CSV_EXPORT = (
    "account_id,shop_id,sender_role,content,sent_at\n"
    "acc-7,shop-7,robot,您好,2024-05-01T10:00:00Z\n"
    "acc-7,shop-7,counterpart,多少钱,2024-05-01T10:01:00Z\n"
    "acc-7,shop-7,martian,???,2024-05-01T10:02:00Z\n"
    "acc-8,shop-8,counterpart,在吗,not-a-time\n"
)


def wait_for_job(admin: Caller, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        body = admin.get(f"/admin/api/imports/{job_id}").get_json()
        if body["finished"]:
            return body
        time.sleep(0.05)
    raise AssertionError(f"import {job_id} did not finish: {body}")


def test_import_jobs_upload_list_detail_and_row_errors(admin: Caller, runtime):
    response = admin.http.post(
        "/admin/api/imports", headers=admin.headers(),
        data={"file": (io.BytesIO(CSV_EXPORT.encode()), "export.csv")},
        content_type="multipart/form-data")
    assert response.status_code == 202, response.get_json()
    job_id = response.get_json()["job_id"]
    job = wait_for_job(admin, job_id)
    assert (job["status"], job["total_rows"], job["inserted"], job["invalid"]) == (
        "partially_succeeded", 4, 2, 2)
    assert job["progress"] == 1.0
    errors = admin.get(f"/admin/api/imports/{job_id}/errors").get_json()
    assert [e["line"] for e in errors["items"]] == [4, 5]
    assert errors["total"] == 2
    listed = admin.get("/admin/api/imports").get_json()["items"]
    assert [j["job_id"] for j in listed] == [job_id]
    imported = admin.get("/admin/api/sessions", origin="import").get_json()["items"]
    assert [s["account_id"] for s in imported] == ["acc-7"]
    assert admin.get("/admin/api/imports/imp_nope").status_code == 404


def test_a_failed_import_keeps_nothing_staged_and_is_uploaded_again(admin: Caller, runtime):
    """SPEC §13: an ended job's staged data is deleted, failed or not; so a failed job
    cannot be retried from it (409 says to upload again), and the upload again works."""
    response = admin.http.post("/admin/api/imports?format=json", headers=admin.headers(),
                               data=CSV_EXPORT.encode(), content_type="text/plain")
    assert response.status_code == 202, response.get_json()
    job_id = response.get_json()["job_id"]
    failed = wait_for_job(admin, job_id)
    assert failed["status"] == "failed" and "JSON" in failed["detail"]
    with runtime.database.read() as db:
        job_pk = db.execute(select(ImportJob.id).where(ImportJob.job_id == job_id)).scalar_one()
        assert db.execute(select(func.count()).select_from(ImportUploadPart)
                          .where(ImportUploadPart.job_pk == job_pk)).scalar_one() == 0

    retried = admin.post(f"/admin/api/imports/{job_id}/retry", {"format": "csv"})
    assert retried.status_code == 409
    assert "upload the file again" in retried.get_json()["detail"]
    assert admin.post(f"/admin/api/imports/{job_id}/retry", {"format": "xml"}
                      ).status_code == 422

    again = admin.http.post("/admin/api/imports?format=csv", headers=admin.headers(),
                            data=CSV_EXPORT.encode(), content_type="text/plain")
    job = wait_for_job(admin, again.get_json()["job_id"])
    assert (job["status"], job["format"], job["inserted"], job["invalid"]) == (
        "partially_succeeded", "csv", 2, 2)


# ---- statistics ------------------------------------------------------------------------------
def test_statistics_count_sessions_transfers_timeouts_and_conflicts(
        admin: Caller, open_session, runtime):
    robot = open_session("AUTO_BARGAIN", "acc-1", "shop-1")
    open_session("AUTO_FOLLOW_UP", "acc-1", "shop-1")  # waits: a conflict
    human = open_session("MANUAL_CUSTOMER_SERVICE", "acc-1", "shop-1")  # preempts: a conflict
    stale = open_session("AUTO_BARGAIN", "acc-2", "shop-2")
    runtime.sessions.expire(stale.session_id, now=utcnow() + timedelta(days=1))
    transfer = runtime.sessions.transfer(human.session_id, TransferRequest(reason="vip"),
                                         actor="client:desk")
    runtime.sessions.accept_transfer(transfer.transfer_id, agent_id="agent-1",
                                     actor="client:desk")
    other = open_session("AUTO_BARGAIN", "acc-3", "shop-3")
    runtime.sessions.transfer(other.session_id, TransferRequest(reason="refund"),
                              actor="client:bot")

    stats = admin.get("/admin/api/stats").get_json()
    assert stats["sessions"]["total"] == 5
    assert stats["sessions"]["by_status"]["TIMEOUT"] == 1
    assert stats["sessions"]["by_status"]["PAUSED"] == 1  # the robot, preempted
    assert stats["sessions"]["by_type"]["AUTO_BARGAIN"] == 3
    assert stats["transfers"]["waiting"] == 1
    assert stats["transfers"]["oldest_waiting_seconds"] >= 0
    assert stats["transfers"]["accepted_24h"] == 1
    assert stats["transfers"]["average_accept_seconds"] >= 0
    last = stats["last_24h"]
    assert (last["sessions_started"], last["transfers"], last["timeouts"]) == (5, 2, 1)
    assert last["conflicts"] == 2
    hourly = stats["hourly"]
    assert len(hourly["hours"]) == 24
    assert hourly["sessions_started"][-1] == 5 and sum(hourly["timeouts"]) == 1
    assert sum(hourly["conflicts"]) == 2
    assert stats["imports"]["running"] == 0
    assert robot.session_id  # the preempted robot is the PAUSED one


@pytest.mark.parametrize("path", ["/admin/api/sessions?limit=0", "/admin/api/audit?after=x"])
def test_bad_queries_are_422_problems(admin: Caller, path: str):
    response = admin.http.get(path, headers=admin.headers())
    assert response.status_code == 422
    assert response.mimetype == "application/problem+json"


def test_every_registered_admin_api_route_is_admin_only(make_caller, http):
    """The list above is written out for readability; this walks the app's own URL map so
    an endpoint added later cannot slip past the admin-only rule."""
    bot = make_caller("bot")
    checked = 0
    for rule in http.application.url_map.iter_rules():
        if not rule.rule.startswith("/admin/api/"):
            continue
        values = {name: "x" for name in rule.arguments}
        if "account_id" in values:
            values.update(account_id="a", shop_id="s")
        path = rule.build(values, append_unknown=False)[1]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            response = http.open(path, method=method, headers=bot.headers(), json={})
            assert response.status_code == 403, (method, rule.rule, response.status_code)
            assert http.open(path, method=method, json={}).status_code == 401, (method, rule.rule)
            checked += 1
    assert checked >= len(ADMIN_ENDPOINTS)
