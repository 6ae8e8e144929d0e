"""Operator corrections (SPEC §11) through the admin API and the console's forms: merge
moves messages, transfers and counters into `into` and leaves an empty ended husk with
`merged_into`; split cuts an ended session before a message into a new one with
`split_from`; both audited with the operator as actor, announced by events, refused
(409) on a session that occupies the slot, and 422 on bad input."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select

from app.audit.models import Operation
from app.db import utcnow
from app.events.models import Event
from app.messages.models import Message
from app.messages.service import LiveMessage
from app.runtime import Runtime
from app.sessions.enums import SenderRole, SessionType
from app.sessions.models import Session
from app.sessions.schemas import SessionRequest
from app.transfers.models import Transfer
from app.transfers.schemas import TransferRequest
from tests.admin.conftest import Caller
from tests.admin.test_console import log_in

_ids = itertools.count()
ROLES = (SenderRole.COUNTERPART, SenderRole.ROBOT, SenderRole.COUNTERPART, SenderRole.ROBOT,
         SenderRole.HUMAN, SenderRole.COUNTERPART)


def talk(runtime: Runtime, session_id: str, n: int, start: datetime) -> list[str]:
    """`n` live messages a minute apart from `start` (roles cycling through ROLES)."""
    ids = [f"m{next(_ids)}" for _ in range(n)]
    runtime.sessions.record_messages(session_id, [
        LiveMessage(message_id=mid, sender_role=ROLES[i % len(ROLES)], content=f"text {mid}",
                    sent_at=start + timedelta(minutes=i))
        for i, mid in enumerate(ids)], actor="client:test")
    return ids


def ended(runtime: Runtime, n: int, start: datetime, *, shop: str = "shop-1",
          session_type: str = "AUTO_FOLLOW_UP", transfer: bool = False) -> tuple[str, list[str]]:
    """A session of (acc-1, shop) that talked `n` messages and completed (after a hand-off
    to the desk when `transfer`)."""
    service = runtime.sessions
    sid = service.create(SessionRequest(account_id="acc-1", shop_id=shop,
                                        session_type=SessionType(session_type)),
                         actor="client:test").session.session_id
    ids = talk(runtime, sid, n, start)
    if transfer:
        trf = service.transfer(sid, TransferRequest(reason="needs a person"), actor="client:test")
        service.accept_transfer(trf.transfer_id, agent_id="agent-1", actor="client:desk")
    service.complete(sid, actor="client:test")
    return sid, ids


def stored(runtime: Runtime, session_id: str) -> dict[str, Any]:
    """The session row and what its messages really add up to."""
    with runtime.database.read() as db:
        row = db.execute(select(Session).where(Session.session_id == session_id)).scalar_one()
        ids = list(db.execute(select(Message.message_id).where(Message.session_pk == row.id)
                              .order_by(Message.sent_at, Message.id)).scalars())
        roles = dict(db.execute(select(Message.sender_role, func.count())
                                .where(Message.session_pk == row.id)
                                .group_by(Message.sender_role)).all())
        times = db.execute(select(func.min(Message.sent_at), func.max(Message.sent_at))
                           .where(Message.session_pk == row.id)).one()
        transfers = list(db.execute(select(Transfer.transfer_id, Transfer.session_id)
                                    .where(Transfer.session_pk == row.id)).all())
        return {"row": row, "ids": ids, "roles": roles, "first": times[0], "last": times[1],
                "transfers": transfers}


def assert_counters_match(runtime: Runtime, session_id: str) -> dict[str, Any]:
    s = stored(runtime, session_id)
    row = s["row"]
    assert row.message_count == len(s["ids"])
    assert row.robot_message_count == s["roles"].get("robot", 0)
    assert row.human_message_count == s["roles"].get("human", 0)
    assert row.counterpart_message_count == s["roles"].get("counterpart", 0)
    assert row.first_message_at == s["first"] and row.last_message_at == s["last"]
    return s


def audit(runtime: Runtime, session_id: str) -> list[Operation]:
    with runtime.database.read() as db:
        return list(db.execute(select(Operation).where(Operation.session_id == session_id)
                               .order_by(Operation.id)).scalars())


def events(runtime: Runtime, session_id: str, kind: str) -> list[Event]:
    with runtime.database.read() as db:
        return list(db.execute(select(Event).where(Event.session_id == session_id,
                                                   Event.type == kind)).scalars())


def chain_intact(admin: Caller, session_id: str) -> bool:
    answer = admin.get(f"/admin/api/sessions/{session_id}/audit/verify")
    assert answer.status_code == 200
    return bool(answer.get_json()["intact"])


def merge(admin: Caller, session_id: str, **body: Any):  # type: ignore[no-untyped-def]
    return admin.post(f"/admin/api/sessions/{session_id}/merge", body)


def split(admin: Caller, session_id: str, **body: Any):  # type: ignore[no-untyped-def]
    return admin.post(f"/admin/api/sessions/{session_id}/split", body)


@pytest.fixture
def t0() -> datetime:
    return utcnow().replace(microsecond=0) - timedelta(hours=6)


# ---- merge -------------------------------------------------------------------------------
def test_merge_moves_messages_transfers_and_counters_into_the_target(
        admin: Caller, runtime: Runtime, t0: datetime):
    first, first_ids = ended(runtime, 4, t0)
    second, second_ids = ended(runtime, 5, t0 + timedelta(hours=1), transfer=True)
    before_first = stored(runtime, first)["row"]
    (transfer_id, _), = stored(runtime, second)["transfers"]

    answer = merge(admin, second, into=first, reason="one conversation cut in two")
    assert answer.status_code == 200, answer.get_json()
    body = answer.get_json()
    assert body["messages_moved"] == 5 and body["transfers_moved"] == [transfer_id]
    assert body["session"]["session_id"] == first
    assert body["session"]["message_count"] == 9
    assert body["session"]["merged_into"] is None
    (husk,) = body["merged"]
    assert husk["session_id"] == second and husk["merged_into"] == first
    assert husk["status"] == "COMPLETED" and husk["message_count"] == 0

    target = assert_counters_match(runtime, first)
    assert target["ids"] == first_ids + second_ids
    assert target["transfers"] == [(transfer_id, first)]
    assert target["row"].first_message_at == t0
    assert target["row"].last_message_at == t0 + timedelta(hours=1, minutes=4)
    assert target["row"].created_at == before_first.created_at  # the earlier one
    assert target["row"].ended_at >= stored(runtime, second)["row"].ended_at
    emptied = assert_counters_match(runtime, second)
    assert emptied["ids"] == [] and emptied["transfers"] == []
    assert emptied["row"].first_message_at is None and emptied["row"].status == "COMPLETED"

    # audited with the operator as actor, on both sessions, chains intact
    (on_target,) = [op for op in audit(runtime, first) if op.operation == "merge"]
    (on_source,) = [op for op in audit(runtime, second) if op.operation == "merge"]
    for op in (on_target, on_source):
        assert op.actor == admin.actor and op.reason == "one conversation cut in two"
        assert op.details["operator"] == "ops-alice"
        assert op.from_status == op.to_status == "COMPLETED"
    assert on_target.details["merged_from"] == [second] and on_target.details["messages"] == 5
    assert on_source.details["merged_into"] == first
    assert chain_intact(admin, first) and chain_intact(admin, second)
    (ev_target,) = events(runtime, first, "session.merged")
    (ev_source,) = events(runtime, second, "session.merged")
    assert ev_target.data["merged_from"] == [second] and ev_target.data["message_count"] == 9
    assert ev_source.data["merged_into"] == first and ev_source.data["messages_moved"] == 5

    # the links show in the session API and on the console's detail
    assert admin.get(f"/admin/api/sessions/{second}").get_json()["session"]["merged_into"] \
        == first
    public = admin.get(f"/api/v1/sessions/{second}").get_json()
    assert public["merged_into"] == first and public["split_from"] is None
    detail = admin.get(f"/admin/api/sessions/{first}").get_json()
    assert len(detail["messages"]) == 9 and detail["transfers"][0]["session_id"] == first


def test_merge_takes_several_sessions_at_once_and_spans_their_times(
        admin: Caller, runtime: Runtime, t0: datetime):
    early, _ = ended(runtime, 2, t0)
    middle, _ = ended(runtime, 3, t0 + timedelta(hours=1))
    late, _ = ended(runtime, 4, t0 + timedelta(hours=2))
    rows = {sid: stored(runtime, sid)["row"] for sid in (early, middle, late)}

    answer = merge(admin, early, into=middle, also=[late], reason="one long chat")
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["messages_moved"] == 6
    target = assert_counters_match(runtime, middle)
    assert target["row"].message_count == 9
    assert target["row"].created_at == rows[early].created_at
    assert target["row"].ended_at == rows[late].ended_at
    assert target["row"].first_message_at == t0
    for sid in (early, late):
        husk = assert_counters_match(runtime, sid)["row"]
        assert husk.merged_into == middle and husk.message_count == 0
    assert len(events(runtime, middle, "session.merged")) == 1
    assert [op.details["merged_from"] for op in audit(runtime, middle)
            if op.operation == "merge"] == [[early, late]]


def test_an_ended_session_merges_into_a_waiting_one_which_keeps_its_place(
        admin: Caller, runtime: Runtime, t0: datetime):
    old, _ = ended(runtime, 3, t0)
    occupant = runtime.sessions.create(SessionRequest(
        account_id="acc-1", shop_id="shop-1", session_type=SessionType.MANUAL_CUSTOMER_SERVICE),
        actor="client:desk").session
    waiting = runtime.sessions.create(SessionRequest(
        account_id="acc-1", shop_id="shop-1", session_type=SessionType.AUTO_FOLLOW_UP),
        actor="client:test").session
    assert waiting.status == "PENDING"

    assert merge(admin, old, into=waiting.session_id, reason="same chat").status_code == 200
    after = assert_counters_match(runtime, waiting.session_id)["row"]
    assert after.status == "PENDING" and after.message_count == 3
    assert after.requested_at == waiting.created_at and after.deadline_at == waiting.deadline_at
    # it still gets the slot when the occupant leaves, and counts on from 3
    runtime.sessions.complete(occupant.session_id, actor="client:desk")
    assert runtime.sessions.get(waiting.session_id).status == "ACTIVE"
    talk(runtime, waiting.session_id, 2, utcnow() - timedelta(minutes=5))
    assert assert_counters_match(runtime, waiting.session_id)["row"].message_count == 5


# ---- split -------------------------------------------------------------------------------
def test_split_cuts_before_the_message_into_a_new_ended_session(
        admin: Caller, runtime: Runtime, t0: datetime):
    sid, ids = ended(runtime, 6, t0, session_type="AUTO_BARGAIN", transfer=True)
    original = stored(runtime, sid)
    (transfer_id, _), = original["transfers"]

    answer = split(admin, sid, at_message_id=ids[3], reason="two conversations")
    assert answer.status_code == 201, answer.get_json()
    body = answer.get_json()
    new = body["new_session"]
    assert body["messages_moved"] == 3
    assert new["split_from"] == sid and body["session"]["split_from"] is None
    for field in ("account_id", "shop_id", "session_type", "origin", "status", "task_type",
                  "owner_id", "priority"):
        assert new[field] == body["session"][field], field
    assert new["status"] == "COMPLETED" and new["merged_into"] is None
    assert admin.get(f"/api/v1/sessions/{new['session_id']}").get_json()["split_from"] == sid

    head = assert_counters_match(runtime, sid)
    tail = assert_counters_match(runtime, new["session_id"])
    assert head["ids"] == ids[:3] and tail["ids"] == ids[3:]
    # it ends at its last message now, never before it started
    assert head["row"].ended_at == max(t0 + timedelta(minutes=2), head["row"].activated_at)
    assert head["row"].ended_at < original["row"].ended_at
    assert tail["row"].created_at == t0 + timedelta(minutes=3)  # its first message
    assert tail["row"].ended_at == original["row"].ended_at
    assert tail["row"].end_reason == original["row"].end_reason
    # the hand-off happened after the cut (the messages are hours old): it goes along
    assert tail["transfers"] == [(transfer_id, new["session_id"])]
    assert body["transfers_moved"] == [transfer_id]

    (on_head,) = [op for op in audit(runtime, sid) if op.operation == "split"]
    (on_tail,) = audit(runtime, new["session_id"])
    assert on_head.actor == on_tail.actor == admin.actor
    assert on_head.details["split_into"] == new["session_id"]
    assert on_head.details["at_message_id"] == ids[3] and on_head.details["messages"] == 3
    assert on_tail.operation == "split" and on_tail.from_status is None
    assert on_tail.details["split_from"] == sid
    assert chain_intact(admin, sid) and chain_intact(admin, new["session_id"])
    assert events(runtime, sid, "session.split")[0].data["split_into"] == new["session_id"]
    assert events(runtime, new["session_id"], "session.split")[0].data["split_from"] == sid

    # split, then merge back: the original conversation, whole again
    assert merge(admin, new["session_id"], into=sid, reason="undo").status_code == 200
    assert assert_counters_match(runtime, sid)["ids"] == ids


def test_messages_sharing_the_cut_time_split_by_arrival(admin: Caller, runtime: Runtime,
                                                         t0: datetime):
    service = runtime.sessions
    sid = service.create(SessionRequest(account_id="acc-1", shop_id="shop-1",
                                        session_type=SessionType.AUTO_FOLLOW_UP),
                         actor="client:test").session.session_id
    same = [LiveMessage(message_id=f"same-{i}", sender_role=SenderRole.COUNTERPART,
                        content="x", sent_at=t0) for i in range(4)]
    for message in same:
        service.record_messages(sid, [message], actor="client:test")
    service.complete(sid, actor="client:test")
    answer = split(admin, sid, at_message_id="same-2", reason="cut")
    assert answer.status_code == 201
    assert stored(runtime, sid)["ids"] == ["same-0", "same-1"]
    assert stored(runtime, answer.get_json()["new_session"]["session_id"])["ids"] == [
        "same-2", "same-3"]


# ---- refusals ----------------------------------------------------------------------------
def test_corrections_touching_the_occupant_or_an_open_session_are_refused(
        admin: Caller, runtime: Runtime, t0: datetime):
    done, done_ids = ended(runtime, 3, t0)
    husk, _ = ended(runtime, 1, t0 + timedelta(hours=2))
    assert merge(admin, husk, into=done, reason="r").status_code == 200
    occupant = runtime.sessions.create(SessionRequest(
        account_id="acc-1", shop_id="shop-1", session_type=SessionType.AUTO_FOLLOW_UP),
        actor="client:test").session.session_id
    occupant_ids = talk(runtime, occupant, 2, t0 + timedelta(hours=1))
    waiting = runtime.sessions.create(SessionRequest(
        account_id="acc-1", shop_id="shop-1", session_type=SessionType.AUTO_FOLLOW_UP),
        actor="client:test").session.session_id
    elsewhere, _ = ended(runtime, 2, t0, shop="shop-2")
    runtime.sessions.transfer(occupant, TransferRequest(reason="person"), actor="client:test")
    snapshot = {sid: stored(runtime, sid)["ids"] for sid in (done, occupant, waiting, husk)}

    refusals = [
        (merge(admin, done, into=occupant, reason="r"), "occupies the slot"),
        (merge(admin, occupant, into=done, reason="r"), "occupies the slot"),
        (merge(admin, waiting, into=done, reason="r"), "only an ended session"),
        (merge(admin, elsewhere, into=done, reason="r"), "only sessions of one slot"),
        (merge(admin, husk, into=done, reason="r"), "already merged"),
        (merge(admin, done, into=husk, reason="r"), "merge into that one"),
        (split(admin, occupant, at_message_id=occupant_ids[1], reason="r"), "occupies"),
        (split(admin, waiting, at_message_id=done_ids[1], reason="r"), "only an ended"),
        (split(admin, done, at_message_id=done_ids[0], reason="r"), "without messages"),
    ]
    for answer, words in refusals:
        body = answer.get_json()
        assert answer.status_code == 409, body
        assert answer.mimetype == "application/problem+json"
        assert body["type"] == "/problems/correction-refused", body
        assert words in body["detail"], body["detail"]
    assert {sid: stored(runtime, sid)["ids"] for sid in snapshot} == snapshot
    with runtime.database.read() as db:
        assert db.execute(select(func.count()).select_from(Operation)
                          .where(Operation.operation.in_(["merge", "split"]))).scalar() == 2
    unknown = merge(admin, "ses_nope", into=done, reason="r")
    assert unknown.status_code == 404 and unknown.get_json()["type"] == "/problems/not-found"
    assert split(admin, "ses_nope", at_message_id="m", reason="r").status_code == 404


@pytest.mark.parametrize(("path", "body", "field"), [
    ("merge", {"reason": "r"}, "into"),
    ("merge", {"into": "", "reason": "r"}, "into"),
    ("merge", {"into": "s" * 41, "reason": "r"}, "into"),
    ("merge", {"into": 12, "reason": "r"}, "into"),
    ("merge", {"into": "ses_x"}, "reason"),
    ("merge", {"into": "ses_x", "reason": "  "}, "reason"),
    ("merge", {"into": "ses_x", "reason": "r" * 256}, "reason"),
    ("merge", {"into": "ses_x", "reason": "\ud800"}, "reason"),
    ("merge", {"into": "ses_x", "reason": "r", "also": "ses_y"}, "also"),
    ("merge", {"into": "ses_x", "reason": "r", "also": [""]}, "also"),
    ("merge", {"into": "ses_x", "reason": "r", "also": ["s"] * 50}, "also"),
    ("merge", {"into": "ses_x", "reason": "r", "extra": 1}, "extra"),
    ("split", {"reason": "r"}, "at_message_id"),
    ("split", {"at_message_id": "m" * 129, "reason": "r"}, "at_message_id"),
    ("split", {"at_message_id": ["m"], "reason": "r"}, "at_message_id"),
    ("split", {"at_message_id": "m"}, "reason"),
])
def test_bad_bodies_are_422_naming_the_field(admin: Caller, runtime: Runtime, t0: datetime,
                                             path: str, body: dict[str, Any], field: str):
    sid, _ = ended(runtime, 2, t0)
    answer = admin.post(f"/admin/api/sessions/{sid}/{path}", body)
    problem = answer.get_json()
    assert answer.status_code == 422, problem
    assert problem["type"] == "/problems/validation"
    assert field in {e["field"] for e in problem["errors"]}, problem


def test_state_dependent_bad_input_is_422_too(admin: Caller, http: FlaskClient,
                                              runtime: Runtime, t0: datetime):
    sid, _ = ended(runtime, 2, t0)
    other, other_ids = ended(runtime, 2, t0 + timedelta(hours=1))
    itself = merge(admin, sid, into=sid, reason="r")
    assert itself.status_code == 422 and itself.get_json()["errors"][0]["field"] == "into"
    foreign = split(admin, sid, at_message_id=other_ids[1], reason="r")
    assert foreign.status_code == 422
    assert foreign.get_json()["errors"][0]["field"] == "at_message_id"
    assert split(admin, sid, at_message_id="no-such-message", reason="r").status_code == 422
    not_json = http.post(f"/admin/api/sessions/{sid}/merge", data=b"{nope",
                         headers={**admin.headers(), "Content-Type": "application/json"})
    assert not_json.status_code == 422
    assert stored(runtime, sid)["row"].message_count == 2
    assert stored(runtime, other)["row"].message_count == 2


# ---- who may correct ---------------------------------------------------------------------
def test_only_admins_and_the_console_with_its_csrf_token_may_correct(
        make_caller, admin: Caller, http: FlaskClient, runtime: Runtime, t0: datetime):
    first, _ = ended(runtime, 2, t0)
    second, second_ids = ended(runtime, 2, t0 + timedelta(hours=1))
    for role in ("bot", "desk"):
        caller = make_caller(role)
        assert merge(caller, second, into=first, reason="r").status_code == 403
        assert split(caller, second, at_message_id=second_ids[1], reason="r").status_code == 403
    assert http.post(f"/admin/api/sessions/{second}/merge",
                     json={"into": first, "reason": "r"}).status_code == 401

    csrf = log_in(http, admin.token)
    path = f"/admin/api/sessions/{second}/merge"
    assert http.post(path, json={"into": first, "reason": "r"}).status_code == 403
    assert http.post(f"/admin/sessions/{second}/merge",
                     data={"into": first, "reason": "r"}).status_code == 403
    assert stored(runtime, second)["row"].message_count == 2
    answer = http.post(path, json={"into": first, "reason": "by cookie"},
                       headers={"X-CSRF-Token": csrf})
    assert answer.status_code == 200
    (op,) = [op for op in audit(runtime, first) if op.operation == "merge"]
    assert op.actor == admin.actor and op.reason == "by cookie"


# ---- the console's forms -----------------------------------------------------------------
def test_console_forms_merge_and_split_and_show_the_links_in_both_languages(
        admin: Caller, http: FlaskClient, runtime: Runtime, t0: datetime):
    first, first_ids = ended(runtime, 4, t0)
    second, _ = ended(runtime, 2, t0 + timedelta(hours=1))
    csrf = log_in(http, admin.token)
    page = http.get(f"/admin/sessions/{first}").get_data(as_text=True)
    assert 'id="merge-form"' in page and 'id="split-form"' in page
    assert f'<option value="{first_ids[1]}">' in page

    merged = http.post(f"/admin/sessions/{second}/merge",
                       data={"into": first, "reason": "same chat", "csrf_token": csrf})
    assert merged.status_code == 302 and merged.headers["Location"].endswith(first)
    cut = http.post(f"/admin/sessions/{first}/split",
                    data={"at_message_id": first_ids[2], "reason": "two chats",
                          "csrf_token": csrf})
    assert cut.status_code == 302
    (tail,) = [s for s in _slot_sessions(runtime) if s.split_from == first]
    assert tail.message_count == 4 and stored(runtime, first)["ids"] == first_ids[:2]

    page = http.get(f"/admin/sessions/{first}").get_data(as_text=True)
    assert "Merged from" in page and second in page and "Split into" in page
    assert tail.session_id in page
    husk_page = http.get(f"/admin/sessions/{second}").get_data(as_text=True)
    assert 'id="merged-into-link"' in husk_page and 'id="merge-form"' not in husk_page
    http.get("/admin/lang/zh")
    tail_page = http.get(f"/admin/sessions/{tail.session_id}").get_data(as_text=True)
    assert "拆分自" in tail_page and 'id="split-from-link"' in tail_page
    assert "人工修正（合并与拆分）" in tail_page

    refused = http.post(f"/admin/sessions/{second}/merge",
                        data={"into": first, "reason": "again", "csrf_token": csrf})
    assert refused.status_code == 409
    assert "already merged" in refused.get_data(as_text=True)
    bad = http.post(f"/admin/sessions/{first}/split",
                    data={"at_message_id": "", "reason": "r", "csrf_token": csrf})
    assert bad.status_code == 422 and "at_message_id" in bad.get_data(as_text=True)


def test_the_console_says_why_an_occupant_cannot_be_corrected(
        admin: Caller, http: FlaskClient, runtime: Runtime):
    live = runtime.sessions.create(SessionRequest(
        account_id="acc-1", shop_id="shop-1", session_type=SessionType.AUTO_FOLLOW_UP),
        actor="client:test").session.session_id
    log_in(http, admin.token)
    page = http.get(f"/admin/sessions/{live}").get_data(as_text=True)
    assert 'id="correction-unavailable"' in page and "occupies the slot" in page
    assert 'id="merge-form"' not in page


def _slot_sessions(runtime: Runtime, shop: str = "shop-1") -> list[Session]:
    with runtime.database.read() as db:
        return list(db.execute(select(Session).where(Session.shop_id == shop)).scalars())


# ---- corrections and later imports ---------------------------------------------------------
def test_a_later_import_never_attaches_to_a_merged_session_and_a_reupload_changes_nothing(
        admin: Caller, runtime: Runtime):
    from freezegun import freeze_time

    from app.imports.dedup import known_sessions
    from tests.imports.helpers import as_ndjson, conversation, run_job

    t0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
    history = conversation("s", t0, "crcr") + conversation("s", t0 + timedelta(hours=2), "crc")
    with freeze_time(t0 + timedelta(days=2)):
        job = run_job(runtime, as_ndjson(history), filename="h.ndjson")
    assert job.sessions_created == 2
    first, second = sorted(_slot_sessions(runtime, "s"), key=lambda s: s.first_message_at)
    # the later one is kept: the husk is the older row, the first a look-up finds
    first, second = second, first
    assert merge(admin, second.session_id, into=first.session_id,
                 reason="one chat").status_code == 200

    more = conversation("s", t0 + timedelta(hours=2, minutes=10), "rc", message_id=None)
    for i, r in enumerate(more):
        r["message_id"] = f"later-{i}"
    with freeze_time(t0 + timedelta(days=2)):
        again = run_job(runtime, as_ndjson(history), filename="again.ndjson")
        later = run_job(runtime, as_ndjson(more), filename="later.ndjson")
    assert again.inserted == 0 and again.sessions_created == 0 and again.sessions_updated == 0
    assert later.inserted == 2 and later.sessions_created == 0
    husk = assert_counters_match(runtime, second.session_id)
    assert husk["ids"] == [] and husk["row"].merged_into == first.session_id
    target = assert_counters_match(runtime, first.session_id)
    assert target["row"].message_count == 9 and set(target["ids"]) >= {"later-0", "later-1"}
    # whatever a later export's times, grouping never even sees the merged session
    with runtime.database.read() as db:
        known = known_sessions(db, [("acc-1", "s")])[("acc-1", "s")]
    assert [k.session_id for k in known] == [first.session_id]
