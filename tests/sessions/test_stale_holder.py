"""A stale lock holder (its lock expired, another process took over) can never
create a second occupant: the slot row's lock orders it with the new holder, and the
fence and the unique occupant key refuse what slips past (a first use of a slot)."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.db import utcnow
from app.errors import FenceRejected, SlotLockUnavailable
from app.runtime import build_runtime
from app.sessions.models import Session
from app.sessions.schemas import SessionRequest
from app.sessions.slot import SlotFence
from tests.sessions.helpers import ask, status_of
from tests.sessions.invariants import check_final_state


def _read_in_thread(runtime, *, shared: bool = False):
    """Start a fence read of ("acc", "shop") on another thread, in a transaction that
    stays open until `release` is set; answers (thread, result dict, release event)."""
    result: dict = {}
    release = threading.Event()

    def read() -> None:
        with runtime.database.unit_of_work() as uow:
            fence = SlotFence(uow.session, "acc", "shop", shared=shared)
            result.update(value=fence.value, occupant=fence.occupant_session_id,
                          at=time.monotonic())
            release.wait(10)

    thread = threading.Thread(target=read)
    thread.start()
    return thread, result, release


@pytest.mark.services  # SQLite serialises writers: two transactions cannot interleave there
def test_a_second_holder_waits_for_the_first_and_reads_its_change(runtime):
    """The fence read locks the slot row: a holder whose lock expired under it (another
    took over) cannot read the fence before the first one's change commits, so it can
    never act on a stale value."""
    with runtime.database.unit_of_work() as first:
        SlotFence(first.session, "acc", "shop").advance(None)  # the first use inserts the row
        first.commit()
    with runtime.database.unit_of_work() as holder_uow:
        holder = SlotFence(holder_uow.session, "acc", "shop")
        thread, seen, release = _read_in_thread(runtime)
        time.sleep(0.3)
        assert seen == {}, "the second read went through while the first holder held the row"
        holder.advance("ses_first")
        committed_at = time.monotonic()
        holder_uow.commit()
    release.set()
    thread.join(10)
    assert seen["value"] == holder.value and seen["occupant"] == "ses_first"
    assert seen["at"] >= committed_at


@pytest.mark.services
def test_requests_joining_the_line_share_the_slot_row_and_a_change_waits_for_them(runtime):
    """Shared reads (creates that only join the line) run side by side; an exclusive
    read (a change of the slot) waits until they end, and they wait for it."""
    with runtime.database.unit_of_work() as first:
        SlotFence(first.session, "acc", "shop").advance("ses_occupant")
        first.commit()
    one, one_seen, one_release = _read_in_thread(runtime, shared=True)
    two, two_seen, two_release = _read_in_thread(runtime, shared=True)
    time.sleep(0.3)
    assert one_seen and two_seen, "two shared reads did not run side by side"
    change, change_seen, change_release = _read_in_thread(runtime)
    time.sleep(0.3)
    assert change_seen == {}, "a change read the slot row while requests held it shared"
    one_release.set()
    two_release.set()
    one.join(10)
    two.join(10)
    deadline = time.monotonic() + 5
    while not change_seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert change_seen["value"] == 1
    late, late_seen, late_release = _read_in_thread(runtime, shared=True)
    time.sleep(0.3)
    assert late_seen == {}, "a shared read went through while a change held the row"
    change_release.set()
    change.join(10)
    late_release.set()
    late.join(10)
    assert late_seen["value"] == 1


@pytest.mark.services
def test_two_first_users_of_a_slot_cannot_both_commit(runtime):
    """A slot with no row yet: both holders read "never used"; the first to insert the
    row wins, the other is refused like a stale fence."""
    with runtime.database.unit_of_work() as stale_uow:
        stale = SlotFence(stale_uow.session, "acc", "fresh-slot")
        with runtime.database.unit_of_work() as fresh_uow:
            fresh = SlotFence(fresh_uow.session, "acc", "fresh-slot")
            assert (fresh.exists, stale.exists) == (False, False)
            fresh.advance("ses_fresh")
            fresh_uow.commit()
        with pytest.raises(FenceRejected):
            stale.advance("ses_stale")
    with runtime.database.read() as db:
        assert SlotFence(db, "acc", "fresh-slot").occupant_session_id == "ses_fresh"


def test_database_refuses_a_second_occupant_whatever_the_caller_believes(runtime, service):
    occupant = ask(service, "AUTO_BARGAIN").session
    now = utcnow()
    with runtime.database.unit_of_work() as uow:
        uow.session.add(
            Session(
                session_id="ses_intruder",
                account_id=occupant.account_id,
                shop_id=occupant.shop_id,
                session_type="AUTO_BARGAIN",
                task_type="negotiation",
                priority=3,
                status="ACTIVE",
                holds_slot=True,
                origin="live",
                created_at=now,
                requested_at=now,
                last_activity_at=now,
                message_count=0,
                robot_message_count=0,
                human_message_count=0,
                counterpart_message_count=0,
                unanswered=False,
            )
        )
        with pytest.raises(IntegrityError):
            uow.session.flush()


@pytest.mark.services
def test_expired_lock_holder_cannot_commit_over_the_new_holder(runtime, settings, backend):
    """Process A takes the slot lock with a short TTL, reads the slot (free), then stalls
    past the TTL. Process B takes the lock and creates an occupant. A wakes up and tries
    to make its own session the occupant: the database refuses, A retries from a fresh
    read and queues behind B instead."""
    slow = build_runtime(settings.model_copy(update={"slot_lock_ttl": 0.3}))
    slow._schema_checked = True
    b_committed = threading.Event()
    attempts: list[str] = []

    def stale_plan(tx):  # type: ignore[no-untyped-def]
        occupant = tx.occupant()
        attempts.append("free" if occupant is None else occupant.session_id)
        if len(attempts) == 1:
            assert b_committed.wait(10), "B never got the expired lock"
        new = Session(
            session_id=f"ses_a{len(attempts)}",
            account_id="acc",
            shop_id="shop",
            session_type="AUTO_BARGAIN",
            task_type="negotiation",
            priority=3,
            status="PENDING",
            origin="live",
            created_at=tx.now,
            requested_at=tx.now,
            last_activity_at=tx.now,
            message_count=0,
            robot_message_count=0,
            human_message_count=0,
            counterpart_message_count=0,
            unanswered=False,
        )
        tx.db.add(new)
        tx.db.flush()
        tx.audit(new, "create", from_status=None)
        if occupant is None:  # what A believes on its stale read
            tx.activate(new)
        else:
            tx.claim_or_wait(new)
        return new.session_id

    def b_takes_over() -> None:
        time.sleep(0.5)  # A's lock (TTL 0.3 s) has expired by now
        ask(runtime.sessions, "MANUAL_CUSTOMER_SERVICE", account="acc", shop="shop")
        b_committed.set()

    helper = threading.Thread(target=b_takes_over)
    helper.start()
    result = slow.sessions.run_on_slot("acc", "shop", "process-a", stale_plan)
    helper.join()
    slow.close()

    assert attempts[0] == "free" and attempts[1].startswith("ses_")  # retried, saw B
    assert status_of(runtime.sessions, result) == "PENDING"
    with runtime.database.read() as db:
        occupants = (
            db.execute(select(Session.session_id).where(Session.holds_slot.is_(True)))
            .scalars()
            .all()
        )
        assert len(occupants) == 1 and occupants[0] != result
        assert db.execute(select(Session).where(Session.session_id == "ses_a1")).first() is None
    assert check_final_state(runtime) == []


def test_unreachable_redis_fails_fast_with_503_and_reads_keep_working(runtime, settings, service):
    existing = ask(service, "AUTO_BARGAIN").session
    broken = build_runtime(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    broken._schema_checked = True
    started = time.monotonic()
    with pytest.raises(SlotLockUnavailable) as caught:
        broken.sessions.create(
            SessionRequest(account_id="acc-9", shop_id="s", session_type="AUTO_BARGAIN"),
            actor="t",
        )
    assert time.monotonic() - started < 5
    assert caught.value.status == 503 and caught.value.retryable
    assert broken.sessions.get(existing.session_id).status == "ACTIVE"
    with runtime.database.read() as db:  # nothing half-written
        assert db.execute(select(Session).where(Session.account_id == "acc-9")).first() is None
    broken.close()
