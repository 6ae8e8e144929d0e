"""SPEC §7: each session's audit-chain head is anchored outside the chain, so deleting
the last rows — which leaves a shorter chain that is still consistent — is detected
by verification per session, over a range and in a sample. Every writer of audit rows
keeps the anchor on the last row's hash, in the same transaction."""

from __future__ import annotations

import io
from datetime import timedelta

import sqlalchemy as sa
from freezegun import freeze_time
from sqlalchemy import delete, select

from app import migrate
from app.audit.models import Operation
from app.audit.trail import check_chain
from app.db import utcnow
from app.imports.service import ImportService
from app.runtime import Runtime
from app.sessions.models import Session
from app.sweeps.service import sweep_sessions
from app.transfers.schemas import TransferRequest
from tests.admin.conftest import Caller
from tests.imports.helpers import as_ndjson, row


def _heads(runtime: Runtime) -> dict[str, tuple[str | None, str | None]]:
    """Per session: (anchored head, hash of its last audit row)."""
    with runtime.database.read() as db:
        sessions = db.execute(select(Session.id, Session.session_id, Session.audit_head)).all()
        found = {}
        for pk, session_id, head in sessions:
            last = db.execute(select(Operation.row_hash).where(Operation.session_pk == pk)
                              .order_by(Operation.id.desc()).limit(1)).scalar_one_or_none()
            found[session_id] = (head, last)
    return found


def _assert_anchored(runtime: Runtime) -> None:
    heads = _heads(runtime)
    assert heads, "no sessions"
    for session_id, (head, last) in heads.items():
        assert last is not None and head == last, session_id
    with runtime.database.read() as db:
        for pk in db.execute(select(Session.id)).scalars():
            assert check_chain(db, pk).intact


def test_deleting_the_last_audit_rows_is_detected(admin: Caller, open_session, runtime):
    victim = open_session("AUTO_BARGAIN", "acc-1", "shop-1")
    runtime.sessions.pause(victim.session_id, actor="client:bot", reason="lunch")
    runtime.sessions.resume(victim.session_id, actor="client:bot")
    bystander = open_session("AUTO_BARGAIN", "acc-2", "shop-2")
    path = f"/admin/api/sessions/{victim.session_id}/audit/verify"
    assert admin.get(path).get_json()["intact"] is True

    # The last two rows (pause, resume) go, straight in the database: the rows left
    # still chain correctly, only the anchor tells.
    with runtime.database.engine.begin() as conn:
        last_two = conn.execute(
            select(Operation.id).where(Operation.session_id == victim.session_id)
            .order_by(Operation.id.desc()).limit(2)).scalars().all()
        conn.execute(delete(Operation).where(Operation.id.in_(last_two)))

    broken = admin.get(path).get_json()
    assert broken == {"session_id": victim.session_id, "intact": False,
                      "first_bad_row_id": None, "rows_checked": 2, "head_matches": False}
    assert admin.get(f"/admin/api/sessions/{bystander.session_id}/audit/verify"
                     ).get_json()["intact"] is True
    since = (utcnow() - timedelta(hours=1)).isoformat()
    ranged = admin.get("/admin/api/audit/verify", **{"from": since}).get_json()
    assert ranged["intact"] is False and ranged["sessions_checked"] == 2
    assert ranged["broken"] == [{"session_id": victim.session_id, "first_bad_row_id": None,
                                 "head_matches": False}]
    sample = admin.get("/admin/api/audit/verify", sample=5).get_json()
    assert sample["intact"] is False and sample["sessions_checked"] == 2


def test_deleting_every_audit_row_of_a_session_is_detected(admin: Caller, open_session,
                                                            runtime):
    victim = open_session("AUTO_BARGAIN", "acc-1", "shop-1")
    open_session("AUTO_BARGAIN", "acc-2", "shop-2")
    with runtime.database.engine.begin() as conn:
        conn.execute(delete(Operation).where(Operation.session_id == victim.session_id))
    path = f"/admin/api/sessions/{victim.session_id}/audit/verify"
    assert admin.get(path).get_json()["head_matches"] is False
    since = (utcnow() - timedelta(hours=1)).isoformat()
    ranged = admin.get("/admin/api/audit/verify", **{"from": since}).get_json()
    assert [b["session_id"] for b in ranged["broken"]] == [victim.session_id]
    assert admin.get("/admin/api/audit/verify", sample=5).get_json()["intact"] is False


def test_an_inserted_last_row_is_detected(admin: Caller, open_session, runtime):
    """A forged row appended at the end chains correctly to the real last row, but is
    not the anchored head."""
    from app.audit.trail import operation_values

    victim = open_session("AUTO_BARGAIN")
    with runtime.database.read() as db:
        pk, head = db.execute(select(Session.id, Session.audit_head)).one()
    forged = operation_values(session_pk=pk, session_id=victim.session_id,
                              operation="complete", from_status="ACTIVE",
                              to_status="COMPLETED", actor="client:nobody", at=utcnow(),
                              prev_hash=head)
    with runtime.database.engine.begin() as conn:
        conn.execute(sa.insert(Operation).values(**forged))
    answer = admin.get(f"/admin/api/sessions/{victim.session_id}/audit/verify").get_json()
    assert answer["intact"] is False and answer["head_matches"] is False


def test_every_writer_keeps_the_head_on_the_last_row(runtime, open_session):
    service = runtime.sessions
    start = utcnow()
    with freeze_time(start) as clock:
        first = open_session("AUTO_BARGAIN", "acc-1", "shop-1")  # free slot: one INSERT
        waiting = open_session("AUTO_FOLLOW_UP", "acc-1", "shop-1")  # joins the line
        urgent = open_session("MANUAL_URGENT", "acc-1", "shop-1")  # preempts
        service.complete(urgent.session_id, actor="client:desk")  # promotes the next
        transfer = service.transfer(first.session_id, TransferRequest(reason="help"),
                                    actor="client:bot")
        service.accept_transfer(transfer.transfer_id, agent_id="agent-1",
                                actor="client:desk")
        idle = open_session("AUTO_BARGAIN", "acc-2", "shop-2")
        _assert_anchored(runtime)
        # The batched timeout sweep (acc-2's idle robot and the waiting follow-up).
        clock.tick(timedelta(hours=1))
        sweep_sessions(runtime)
    assert {s for s, _ in _heads(runtime).items()} >= {idle.session_id, waiting.session_id}
    _assert_anchored(runtime)

    # History import: closed sessions (inserted with their head) and messages attached
    # to an ended session (its UPDATE carries the new head).
    t0 = start - timedelta(days=3)
    rows = [row("shop-h", "counterpart", t0 + timedelta(minutes=i), f"m{i}", account="acc-h")
            for i in range(4)]
    imports = ImportService(runtime)
    for batch in (rows[:2], rows[2:]):
        job = imports.create_job(io.BytesIO(as_ndjson(batch)), filename="h.ndjson")
        for pk in imports.prepare(job.job_id).chunk_pks:
            imports.process_chunk(pk)
        assert imports.finish(job.job_id).inserted == 2
    _assert_anchored(runtime)


def test_the_migration_backfills_the_head_of_existing_sessions(backend, tmp_path):
    if backend.is_mysql:
        name = f"{backend.db_name}_chainhead"
        url = backend.database_url.rsplit("/", 1)[0] + f"/{name}"
        server = sa.create_engine(backend.server_url)
        with server.begin() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
            conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        server.dispose()
    else:
        url = f"sqlite:///{tmp_path / 'backfill.sqlite3'}"
    migrate.upgrade(url, "0007")
    engine = sa.create_engine(url)
    now = "2026-01-01 00:00:00"  # a plain DATETIME literal, the same on both backends
    with engine.begin() as conn:
        for pk in (1, 2):
            conn.execute(sa.text(
                "INSERT INTO sessions (id, session_id, account_id, shop_id, session_type,"
                " task_type, priority, status, origin, created_at, requested_at,"
                " last_activity_at, message_count, robot_message_count, human_message_count,"
                " counterpart_message_count, unanswered) VALUES (:pk, :sid, 'a', :shop,"
                " 'AUTO_BARGAIN', 'negotiation', 3, 'COMPLETED', 'live', :now, :now, :now,"
                " 0, 0, 0, 0, 0)"), {"pk": pk, "sid": f"ses_{pk}", "shop": f"s{pk}",
                                      "now": now})
        for i, (pk, digest) in enumerate([(1, "a" * 64), (1, "b" * 64), (2, "c" * 64)]):
            conn.execute(sa.text(
                "INSERT INTO session_operations (id, session_pk, session_id, operation,"
                " actor, created_at, row_hash) VALUES (:id, :pk, :sid, 'x', 'y', :now, :h)"),
                {"id": 10 + i, "pk": pk, "sid": f"ses_{pk}", "now": now, "h": digest})
    engine.dispose()
    migrate.upgrade(url)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        heads = dict(conn.execute(sa.text("SELECT id, audit_head FROM sessions")).all())
    engine.dispose()
    assert heads == {1: "b" * 64, 2: "c" * 64}
    migrate.downgrade(url, "0007")
    if backend.is_mysql:
        server = sa.create_engine(backend.server_url)
        with server.begin() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        server.dispose()
