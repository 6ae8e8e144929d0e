"""Merges and splits raced by each other and by live traffic, on MariaDB + Redis.

One slot, a few threads of each: operators merging and splitting the slot's sessions at
random (overlapping sets, stale picks, the occupant among them), bots posting live
messages to whichever session occupies the slot, and a lifecycle thread ending the
occupant and asking for a new one over and over (so sessions become correctable while
the correctors look at them). Afterwards every message ever accepted is stored exactly
once, every session's counters and first/last times are what its messages add up to,
merged sessions hold nothing, links name real sessions, every audit chain verifies, and
only the answers a correction may give were given.
"""

from __future__ import annotations

import io
import itertools
import random
import threading
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy import text as sa_text

from app.audit.models import Operation
from app.audit.trail import verify_chain
from app.db import utcnow
from app.errors import AutoSessionError
from app.imports.service import ImportService
from app.messages.models import Message
from app.messages.service import LiveMessage
from app.runtime import Runtime
from app.sessions.corrections import merge_sessions, split_session
from app.sessions.enums import SenderRole, SessionType
from app.sessions.models import Session
from app.sessions.schemas import SessionRequest

pytestmark = [pytest.mark.services, pytest.mark.slow]

ACCOUNT, SHOP = "acc-race", "shop-race"
OPERATOR = "client:cli_ops"
ROLES = (SenderRole.COUNTERPART, SenderRole.ROBOT, SenderRole.HUMAN)
SEEDED_SESSIONS = 6
SEEDED_MESSAGES = 25
RUN_SECONDS = 6.0
# What a correction may answer in a race: done, or refused with a reason.
ALLOWED = {
    "ok",
    "/problems/correction-refused",  # the occupant, an open session, already merged, …
    "/problems/validation",  # a message picked a moment ago has moved since
    "/problems/slot-busy",  # the slot lock was held longer than SLOT_LOCK_WAIT
}
ENDED = {"COMPLETED", "CANCELLED", "TIMEOUT"}
OCCUPYING = {"ACTIVE", "TRANSFERRED"}
_ids = itertools.count()


def new_session(runtime: Runtime) -> str:
    return runtime.sessions.create(SessionRequest(
        account_id=ACCOUNT, shop_id=SHOP, session_type=SessionType.AUTO_FOLLOW_UP),
        actor="client:bot").session.session_id


def post(runtime: Runtime, session_id: str, n: int = 1) -> list[str]:
    """Post `n` messages; answers the ids accepted ([] when refused)."""
    base = utcnow() - timedelta(minutes=10)
    messages = [LiveMessage(message_id=f"r{next(_ids)}", sender_role=random.choice(ROLES),
                            content="hello", sent_at=base + timedelta(
                                milliseconds=random.randrange(600_000)))
                for _ in range(n)]
    try:
        outcome = runtime.sessions.record_messages(session_id, messages, actor="client:bot")
    except AutoSessionError:
        return []
    return outcome.accepted_ids


def slot_sessions(runtime: Runtime) -> list[Session]:
    with runtime.database.read() as db:
        return list(db.execute(select(Session).where(Session.account_id == ACCOUNT,
                                                     Session.shop_id == SHOP)).scalars())


def some_message_of(runtime: Runtime, pk: int) -> str | None:
    with runtime.database.read() as db:
        ids = list(db.execute(select(Message.message_id).where(Message.session_pk == pk)
                              .limit(200)).scalars())
    return random.choice(ids) if ids else None


def test_merges_and_splits_racing_each_other_and_live_traffic_lose_nothing(runtime: Runtime):
    accepted: list[str] = []
    answers: Counter[str] = Counter()
    unexpected: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    for _ in range(SEEDED_SESSIONS):
        sid = new_session(runtime)
        for _ in range(SEEDED_MESSAGES // 5):
            accepted.extend(post(runtime, sid, 5))
        runtime.sessions.complete(sid, actor="client:bot")
    assert len(accepted) == SEEDED_SESSIONS * SEEDED_MESSAGES
    current = [new_session(runtime)]
    new_session(runtime)  # waits in line: promoted when the occupant ends

    def poster() -> None:
        while not stop.is_set():
            got = post(runtime, current[0], random.choice((1, 1, 3)))
            with lock:
                accepted.extend(got)

    def lifecycle() -> None:
        while not stop.is_set():
            time.sleep(0.15)
            try:
                runtime.sessions.complete(current[0], actor="client:bot")
                current[0] = next(s.session_id for s in slot_sessions(runtime)
                                  if s.holds_slot)
                new_session(runtime)  # the next one in line
            except AutoSessionError as exc:
                with lock:
                    unexpected.append(f"lifecycle: {exc.type} {exc.detail}")

    def corrector(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            sessions = slot_sessions(runtime)
            try:
                if rng.random() < 0.55:
                    target, *sources = rng.sample(sessions, min(len(sessions),
                                                                rng.choice((2, 2, 3))))
                    merged = merge_sessions(runtime.sessions,
                                            [s.session_id for s in sources],
                                            into=target.session_id, actor=OPERATOR,
                                            reason="race")
                    touched = [merged.session, *merged.merged]
                    assert all(s.status in ENDED for s in merged.merged), merged
                else:
                    victim = rng.choice(sessions)
                    at = some_message_of(runtime, victim.id)
                    if at is None:
                        continue
                    cut = split_session(runtime.sessions, victim.session_id,
                                        at_message_id=at, actor=OPERATOR, reason="race")
                    touched = [cut.session, cut.new_session]
                    assert all(s.status in ENDED for s in touched), cut
                assert not any(s.status in OCCUPYING for s in touched), touched
                outcome = "ok"
            except AutoSessionError as exc:
                outcome = exc.type
            except Exception as exc:  # noqa: BLE001 - any other is a failure of the test
                outcome = f"crash: {exc!r}"
            with lock:
                answers[outcome] += 1
                if outcome not in ALLOWED:
                    unexpected.append(outcome)

    threads = [threading.Thread(target=poster) for _ in range(3)]
    threads += [threading.Thread(target=lifecycle)]
    threads += [threading.Thread(target=corrector, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(RUN_SECONDS)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)

    assert unexpected == [], unexpected[:5]
    assert answers["ok"] >= 10, answers
    assert answers["/problems/correction-refused"] >= 5, answers  # the occupant was picked
    sessions = {s.session_id: s for s in slot_sessions(runtime)}
    assert any(s.merged_into for s in sessions.values()), answers
    assert any(s.split_from for s in sessions.values()), answers
    assert sum(1 for s in sessions.values() if s.holds_slot) == 1

    with runtime.database.read() as db:
        stored = Counter(db.execute(select(Message.message_id).where(
            Message.account_id == ACCOUNT, Message.shop_id == SHOP)).scalars())
        truth: dict[int, dict[str, Any]] = {}
        for pk, role, n, first, last in db.execute(
                select(Message.session_pk, Message.sender_role, func.count(),
                       func.min(Message.sent_at), func.max(Message.sent_at))
                .group_by(Message.session_pk, Message.sender_role)).all():
            t = truth.setdefault(pk, {"count": 0, "first": first, "last": last})
            t["count"] += n
            t[str(role)] = n
            t["first"], t["last"] = min(t["first"], first), max(t["last"], last)
        chains = {sid: verify_chain(db, s.id) for sid, s in sessions.items()}
        corrections = db.execute(select(Operation).where(
            Operation.operation.in_(["merge", "split"]))).scalars().all()
    assert len(corrections) >= 2 * answers["ok"]
    # no correction ever touched a session while it occupied the slot
    assert not [op for op in corrections if op.from_status in OCCUPYING
                or op.to_status in OCCUPYING]

    assert len(accepted) == len(set(accepted))
    assert set(stored) == set(accepted), (len(stored), len(accepted))  # none lost
    assert max(stored.values()) == 1  # none doubled
    for sid, s in sessions.items():
        t = truth.get(s.id, {"count": 0, "first": None, "last": None})
        assert s.message_count == t["count"], sid
        assert s.robot_message_count == t.get("robot", 0), sid
        assert s.human_message_count == t.get("human", 0), sid
        assert s.counterpart_message_count == t.get("counterpart", 0), sid
        assert (s.first_message_at, s.last_message_at) == (t["first"], t["last"]), sid
        if s.merged_into:
            assert s.message_count == 0 and s.merged_into in sessions, sid
            assert s.status in ("COMPLETED", "CANCELLED", "TIMEOUT"), sid
        if s.split_from:
            assert s.split_from in sessions, sid
        assert chains[sid][0], (sid, chains[sid])


def test_an_import_planned_before_a_merge_never_writes_into_the_merged_session(
        runtime: Runtime, backend):  # type: ignore[no-untyped-def]
    """The bulk import reads its targets without a lock. Ordered by row locks: the
    import plans to continue session X, a merge of X into Y commits, then the import
    writes — it must notice and redo the slot under the slot lock (onto Y)."""
    from tests.imports.helpers import as_ndjson, conversation, run_job

    t0 = utcnow().replace(microsecond=0) - timedelta(days=2)
    earlier = conversation("imp", t0 - timedelta(hours=2), "crcr")
    history = conversation("imp", t0, "crc")
    for i, r in enumerate(earlier + history):
        r["message_id"] = f"h{i}"
    run_job(runtime, as_ndjson(earlier + history), filename="h.ndjson")
    y, x = sorted((s for s in slot_sessions_of(runtime, "imp")),
                  key=lambda s: s.first_message_at)
    more = conversation("imp", t0 + timedelta(minutes=10), "rc")
    for i, r in enumerate(more):
        r["message_id"] = f"later-{i}"

    # a statement of this test's database waiting for a row lock (InnoDB may show a
    # unique-key lock wait as RUNNING in its optimizer phase: the process list is surer)
    waiting = sa_text(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = :db "
        "AND COMMAND = 'Query' AND INFO LIKE '%FOR UPDATE' AND ID != CONNECTION_ID()")

    def until_waiting(n: int) -> None:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            with runtime.database.engine.connect() as probe:
                if probe.execute(waiting, {"db": backend.db_name}).scalar() == n:
                    return
            time.sleep(0.02)
        raise AssertionError(f"never {n} statements waiting for a row lock")

    imports = ImportService(runtime)  # staged before the race: only the chunk runs in it
    job = imports.create_job(io.BytesIO(as_ndjson(more)), filename="m.ndjson")
    chunks = imports.prepare(job.job_id).chunk_pks

    def import_chunks() -> None:
        for chunk_pk in chunks:
            imports.process_chunk(chunk_pk)
        imports.finish(job.job_id)

    errors: list[BaseException] = []

    def run(target: Any) -> threading.Thread:
        def body() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
        thread = threading.Thread(target=body)
        thread.start()
        return thread

    with runtime.database.engine.connect() as holder:
        holder.execute(select(Session.id).where(Session.id == x.id).with_for_update())
        merging = run(lambda: merge_sessions(runtime.sessions, [x.session_id],
                                             into=y.session_id, actor=OPERATOR,
                                             reason="one chat"))
        until_waiting(1)  # the merge waits for X first
        importing = run(import_chunks)
        until_waiting(2)  # the import planned onto X and waits for it behind the merge
        holder.rollback()
    merging.join(30)
    importing.join(30)
    assert errors == []

    with runtime.database.read() as db:
        husk = db.get_one(Session, x.id)
        target = db.get_one(Session, y.id)
        in_husk = db.execute(select(func.count()).where(Message.session_pk == x.id)).scalar()
        in_target = set(db.execute(select(Message.message_id)
                                   .where(Message.session_pk == y.id)).scalars())
    assert husk.merged_into == y.session_id
    assert in_husk == 0 and husk.message_count == 0
    assert {"later-0", "later-1"} <= in_target
    assert target.message_count == len(in_target) == 9


def slot_sessions_of(runtime: Runtime, shop: str) -> list[Session]:
    with runtime.database.read() as db:
        return list(db.execute(select(Session).where(Session.account_id == "acc-1",
                                                     Session.shop_id == shop)).scalars())
