"""Idempotency-Key on create: replays, mismatches, failures and concurrent retries."""

from __future__ import annotations

import threading
from datetime import timedelta

from freezegun import freeze_time
from sqlalchemy import func, select

from app.clients.idempotency import IdempotencyStore
from app.clients.models import IdempotencyRecord
from app.sessions.models import Session

BODY = {"account_id": "acc-1", "shop_id": "shop-1", "session_type": "AUTO_BARGAIN"}


def counts(runtime) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    with runtime.database.read() as db:
        sessions = db.execute(select(func.count()).select_from(Session)).scalar_one()
        records = db.execute(select(func.count()).select_from(IdempotencyRecord)).scalar_one()
    return sessions, records


def test_same_key_other_body_is_409_and_creates_nothing(bot, runtime):
    assert bot.post("/api/v1/sessions", BODY, headers={"Idempotency-Key": "k"}).status_code == 201
    other = bot.post("/api/v1/sessions", {**BODY, "shop_id": "shop-2"},
                     headers={"Idempotency-Key": "k"})
    assert other.status_code == 409
    assert other.get_json()["type"] == "/problems/idempotency-key-reuse"
    assert counts(runtime) == (1, 1)


def test_equivalent_bodies_share_a_key(bot, runtime):
    """The fingerprint is of the validated request: alias and case do not matter."""
    first = bot.post("/api/v1/sessions", BODY, headers={"Idempotency-Key": "k"})
    again = bot.post("/api/v1/sessions", {"user_id": "acc-1", "shop_id": "shop-1",
                                          "session_type": "auto_bargain"},
                     headers={"Idempotency-Key": "k"})
    assert again.get_json()["session_id"] == first.get_json()["session_id"]
    assert counts(runtime) == (1, 1)


def test_keys_belong_to_one_client(bot, other_bot, runtime):
    a = bot.post("/api/v1/sessions", BODY, headers={"Idempotency-Key": "same"})
    b = other_bot.post("/api/v1/sessions", {**BODY, "shop_id": "x"},
                       headers={"Idempotency-Key": "same"})
    assert a.status_code == b.status_code == 201
    assert a.get_json()["session_id"] != b.get_json()["session_id"]


def test_a_failed_create_releases_the_key(bot, desk, runtime):
    desk.create("MANUAL_COMPLAINT")
    body = {**BODY, "on_conflict": "reject"}
    assert bot.post("/api/v1/sessions", body, headers={"Idempotency-Key": "r"}).status_code == 409
    assert counts(runtime) == (1, 0)
    # once the human is done, the retry with the same key is evaluated afresh
    human = desk.get("/api/v1/sessions").get_json()["items"][0]
    desk.post(f"/api/v1/sessions/{human['session_id']}/complete")
    retry = bot.post("/api/v1/sessions", body, headers={"Idempotency-Key": "r"})
    assert retry.status_code == 201 and retry.get_json()["status"] == "ACTIVE"


def test_invalid_key_is_422(bot):
    response = bot.post("/api/v1/sessions", BODY, headers={"Idempotency-Key": "x" * 256})
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["field"] == "Idempotency-Key"


def test_concurrent_requests_with_one_key_create_one_session(app, bot, runtime):
    """Eight retries racing: one creates, the others wait for and replay its answer."""
    answers: list[tuple[int, str | None]] = []
    barrier = threading.Barrier(8)

    def call() -> None:
        client = app.test_client()
        barrier.wait()
        response = client.post("/api/v1/sessions", json=BODY,
                               headers=bot.headers({"Idempotency-Key": "race"}))
        answers.append((response.status_code, response.get_json().get("session_id")))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 8
    assert {code for code, _ in answers} == {201}
    assert len({sid for _, sid in answers}) == 1
    assert counts(runtime) == (1, 1)


def test_answers_older_than_the_ttl_are_purged_in_batches(bot, runtime):
    """Beat's purge forgets keys past IDEMPOTENCY_TTL (in batches) and keeps recent ones;
    a forgotten key is a new request."""
    with freeze_time("2026-01-01 08:00:00"):
        old = [bot.post("/api/v1/sessions", {**BODY, "shop_id": f"old-{n}"},
                        headers={"Idempotency-Key": f"old-{n}"}).get_json()["session_id"]
               for n in range(5)]
    with freeze_time("2026-01-02 09:00:00"):
        bot.post("/api/v1/sessions", {**BODY, "shop_id": "new"},
                 headers={"Idempotency-Key": "new"})
        store = IdempotencyStore(runtime.database)
        assert store.purge(older_than=timedelta(hours=24), batch=2) == 5
        with runtime.database.read() as db:
            assert db.execute(select(IdempotencyRecord.key)).scalars().all() == ["new"]
        # the old key now makes a new session (the first one is still there, ACTIVE)
        again = bot.post("/api/v1/sessions", {**BODY, "shop_id": "old-0"},
                         headers={"Idempotency-Key": "old-0"})
        assert again.status_code == 201
        assert again.headers.get("Idempotent-Replayed") is None
        assert again.get_json()["session_id"] != old[0]
        assert again.get_json()["status"] == "PENDING"


def test_the_purge_runs_on_beat_with_the_configured_ttl(bot, runtime):
    from tasks.celery_app import celery
    from tasks.clients import purge_idempotency_task

    entry = celery.conf.beat_schedule["purge-idempotency"]
    assert entry["task"] == purge_idempotency_task.name
    assert entry["schedule"] == runtime.settings.maintenance_interval
    with freeze_time("2026-01-01 08:00:00"):
        bot.post("/api/v1/sessions", BODY, headers={"Idempotency-Key": "k"})
    with freeze_time("2026-01-01 08:00:00") as frozen:
        frozen.tick(runtime.settings.idempotency_ttl - 60)
        assert purge_idempotency_task() == {"purged": 0}
        frozen.tick(120)
        assert purge_idempotency_task() == {"purged": 1}
    assert counts(runtime) == (1, 0)
