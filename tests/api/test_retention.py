"""Retention (SPEC §6, §13): beat purges old events, webhook deliveries and their
attempts, expired console log-ins and ended jobs' staged data in batches; a feed
cursor below what was purged answers `410 /problems/cursor-expired` with the cursor to
resume from, and a cursor at or after it reads normally (purged ids are no hole)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time
from sqlalchemy import delete as sa_delete
from sqlalchemy import func, insert, select

from admin.models import ConsoleLogin
from app.db import utcnow
from app.delivery.models import WebhookAttempt, WebhookDelivery
from app.events.models import Event
from app.imports.models import (
    ImportChunk,
    ImportChunkPart,
    ImportJob,
    ImportSlotMark,
    ImportUploadPart,
)
from app.imports.service import ImportService
from app.retention.models import RetentionMark
from app.retention.service import purge_expired
from tests.imports.helpers import as_ndjson, row

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
WEEK = 604800
MONTH = 2592000


def _count(runtime, model) -> int:  # type: ignore[no-untyped-def]
    with runtime.database.read() as db:
        return db.execute(select(func.count()).select_from(model)).scalar_one()


def _purge(runtime, **kw):  # type: ignore[no-untyped-def]
    settings = runtime.settings
    return purge_expired(runtime.database, events_retention=settings.events_retention,
                         deliveries_retention=settings.deliveries_retention, **kw)


def _event_ids(runtime) -> list[int]:  # type: ignore[no-untyped-def]
    with runtime.database.read() as db:
        return list(db.execute(select(Event.id).order_by(Event.id)).scalars())


def test_old_events_are_purged_and_an_expired_cursor_answers_410(runtime, bot):
    assert runtime.settings.events_retention == WEEK
    with freeze_time(T0):
        old = [bot.create("AUTO_BARGAIN", shop=f"old-{i}")["session_id"] for i in range(5)]
        first = bot.get("/api/v1/events", limit=2).get_json()
    assert len(first["items"]) == 2
    with freeze_time(T0 + timedelta(days=6, hours=23)):
        assert _purge(runtime).events == 0  # not a week old yet
    with freeze_time(T0 + timedelta(days=8)):
        new = [bot.create("AUTO_BARGAIN", shop=f"new-{i}")["session_id"] for i in range(3)]
        ids_before = _event_ids(runtime)
        report = _purge(runtime, batch=2)  # 5 old events in 3 batches
        assert report.events == 5 and len(report.batches) == 3
        kept = _event_ids(runtime)
        assert kept == ids_before[5:] and len(kept) == 3
        mark = ids_before[4]

        expired = bot.get("/api/v1/events", after=first["next"])
        assert expired.status_code == 410
        assert expired.headers["Content-Type"].startswith("application/problem+json")
        problem = expired.get_json()
        assert problem["type"] == "/problems/cursor-expired"
        assert problem["status"] == 410 and problem["oldest_cursor"] == mark

        # From oldest_cursor on: the new events at once (they are not settled yet, and
        # the purged ids before them are not taken for a hole).
        resumed = bot.get("/api/v1/events", after=mark).get_json()
        assert [e["session_id"] for e in resumed["items"]] == new
        fresh = bot.get("/api/v1/events").get_json()  # no cursor: the oldest kept event on
        assert [e["session_id"] for e in fresh["items"]] == new
        assert bot.get("/api/v1/events", after=resumed["next"]).get_json() == {
            "items": [], "next": resumed["next"]}
    assert not set(old) & {e["session_id"] for e in resumed["items"]}
    with runtime.database.read() as db:
        assert db.get(RetentionMark, "events").purged_through == mark


def test_a_cursor_before_the_mark_is_expired_even_with_nothing_newer(runtime, admin):
    with freeze_time(T0), runtime.database.engine.begin() as conn:
        conn.execute(insert(Event), [
            {"id": i, "type": "test.event", "audience": "admin", "occurred_at": utcnow(),
             "data": {}} for i in (1, 2, 3)])
    with freeze_time(T0 + timedelta(days=8)):
        assert _purge(runtime).events == 3
        assert admin.get("/api/v1/events", after=1).get_json()["oldest_cursor"] == 3
        assert admin.get("/api/v1/events", after=3).get_json() == {"items": [], "next": 3}
        assert admin.get("/api/v1/events").get_json() == {"items": [], "next": 0}


def test_a_young_event_stops_the_purge_of_the_prefix(runtime, admin):
    """The purge deletes an id prefix: an event that committed late with an older time
    is not deleted from under an id that is still kept."""
    with runtime.database.engine.begin() as conn:
        conn.execute(insert(Event), [
            {"id": 1, "type": "t", "audience": "admin", "occurred_at": T0, "data": {}},
            {"id": 2, "type": "t", "audience": "admin",
             "occurred_at": T0 + timedelta(days=7), "data": {}},
            {"id": 3, "type": "t", "audience": "admin", "occurred_at": T0, "data": {}}])
    with freeze_time(T0 + timedelta(days=8)):
        assert _purge(runtime).events == 1
    assert _event_ids(runtime) == [2, 3]
    with freeze_time(T0 + timedelta(days=15)):
        assert _purge(runtime).events == 2


def test_old_webhook_deliveries_and_their_attempts_are_purged(runtime):
    def delivery(pk: int, created: datetime) -> dict:
        return {"id": pk, "delivery_id": f"dlv_{pk}", "client_id": "cli_1", "event_pk": pk,
                "session_id": None, "event_type": "t", "status": "failed", "attempts": 1,
                "next_attempt_at": created, "created_at": created}

    with runtime.database.engine.begin() as conn:
        conn.execute(insert(WebhookDelivery), [delivery(1, T0), delivery(2, T0),
                                               delivery(3, T0 + timedelta(days=20))])
        conn.execute(insert(WebhookAttempt), [
            {"delivery_pk": pk, "attempt": 1, "url": "http://x", "attempted_at": T0,
             "duration_ms": 1} for pk in (1, 1, 2, 3)])
    with freeze_time(T0 + timedelta(days=29)):
        assert _purge(runtime).deliveries == 0
    with freeze_time(T0 + timedelta(days=31)):
        report = _purge(runtime, batch=1)
    assert (report.deliveries, report.attempts) == (2, 3)
    with runtime.database.read() as db:
        assert list(db.execute(select(WebhookDelivery.id)).scalars()) == [3]
        assert list(db.execute(select(WebhookAttempt.delivery_pk)).scalars()) == [3]


def test_expired_console_logins_are_purged(runtime, admin):
    with runtime.database.engine.begin() as conn:
        conn.execute(insert(ConsoleLogin), [
            {"login_id": f"{i:064x}", "client_id": admin.client_id, "token_hash": "h",
             "created_at": T0, "expires_at": T0 + timedelta(hours=hours),
             "ended_at": None} for i, hours in enumerate((1, 12, 48))])
    with freeze_time(T0 + timedelta(hours=13)):
        assert _purge(runtime).console_logins == 2
    assert _count(runtime, ConsoleLogin) == 1


def test_staged_data_left_by_an_ended_job_is_purged(runtime):
    service = ImportService(runtime)
    rows = [row("shop-1", "counterpart", T0 + timedelta(minutes=i), f"m{i}") for i in range(3)]
    done = service.create_job(io.BytesIO(as_ndjson(rows)), filename="a.ndjson")
    for pk in service.prepare(done.job_id).chunk_pks:
        service.process_chunk(pk)
    service.finish(done.job_id)
    running = service.create_job(io.BytesIO(as_ndjson(rows)), filename="b.ndjson")
    with runtime.database.engine.begin() as conn:
        ended = conn.execute(select(ImportJob.id).where(ImportJob.job_id == done.job_id)
                             ).scalar_one()
        # What a crash between the job's end and its clean-up would leave behind.
        conn.execute(insert(ImportUploadPart).values(job_pk=ended, seq=0, data=b"x"))
        conn.execute(insert(ImportChunkPart).values(job_pk=ended, bucket=0, seq=0,
                                                    row_count=1, payload=b"x"))
        chunk = conn.execute(select(ImportChunk.id).where(ImportChunk.job_pk == ended)
                             ).scalars().first()
        conn.execute(insert(ImportSlotMark).values(chunk_pk=chunk, account_id="a",
                                                   shop_id="s", counts={}))
    report = _purge(runtime)
    assert report.import_jobs == 1
    with runtime.database.read() as db:
        staged = db.execute(select(ImportUploadPart.job_pk).distinct()).scalars().all()
        running_pk = db.execute(select(ImportJob.id).where(ImportJob.job_id
                                                           == running.job_id)).scalar_one()
        assert staged == [running_pk]  # a running job's upload stays
    assert _count(runtime, ImportChunkPart) == 0 and _count(runtime, ImportSlotMark) == 0


def test_the_beat_task_runs_the_purge(runtime):
    from tasks.celery_app import TASK_MODULES, celery
    from tasks.retention import purge_retention_task

    assert "tasks.retention" in TASK_MODULES  # workers and beat import it
    entry = celery.conf.beat_schedule["purge-retention"]
    assert entry["task"] == purge_retention_task.name
    assert entry["schedule"] == runtime.settings.maintenance_interval

    with runtime.database.engine.begin() as conn:
        conn.execute(insert(Event), [{"id": 1, "type": "t", "audience": "admin",
                                      "occurred_at": T0, "data": {}}])
    with freeze_time(T0 + timedelta(days=8)):
        result = purge_retention_task()
    assert result["ran"] is True and result["events"] == 1 and result["complete"] is True


def test_the_contract_documents_the_410(http):
    responses = http.get("/openapi.json").get_json()["paths"]["/api/v1/events"]["get"][
        "responses"]
    assert "410" in responses and "oldest_cursor" in responses["410"]["description"]


@pytest.mark.services
def test_a_purge_batch_in_flight_blocks_no_slot_operation(runtime, bot):
    """While a purge batch holds its delete uncommitted (its row locks on the old
    prefix, the mark's row locked), creates append events, the feed reads and the
    feed reads: nothing waits for it (a wait would end in MariaDB's 5 s lock timeout, a
    503). The same batch run at REPEATABLE READ locks the gap at the table's end and
    every create fails here."""
    from app.retention.service import _set_mark

    with freeze_time(T0):
        for i in range(3):
            bot.create("AUTO_BARGAIN", shop=f"old-{i}")
    with freeze_time(T0 + timedelta(days=8)):
        with runtime.database.unit_of_work() as purge:  # the batch, left open
            old = _event_ids(runtime)
            purge.session.execute(sa_delete(Event).where(Event.id <= old[-1]))
            _set_mark(purge.session, "events", old[-1], utcnow())
            created = [bot.create("AUTO_BARGAIN", shop=f"new-{i}") for i in range(3)]
            bot.post(f"/api/v1/sessions/{created[0]['session_id']}/pause")
            page = bot.get("/api/v1/events", after=old[-1])
            assert page.status_code == 200
            assert len(page.get_json()["items"]) == 4  # 3 activated, 1 paused; mark not yet moved
            purge.commit()
        assert bot.get("/api/v1/events", after=1).status_code == 410
