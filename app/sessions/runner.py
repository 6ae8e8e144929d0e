"""Runs slot transactions (`SlotTx`, `app/sessions/slot_tx.py`): the slot lock, one unit
of work, the fence, and the retry from a fresh read when a holder went stale. The base
of the session service; the transfers, corrections and imports run their slot work
through it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError

from app.config import Settings
from app.coordination.markers import BusySlots
from app.coordination.slot_locks import SlotLocks
from app.db import Database, is_retryable_db_error
from app.errors import FenceRejected, NotFound, ServiceUnavailable
from app.sessions.activity import deadline_after
from app.sessions.models import Session
from app.sessions.slot import wait_a_little
from app.sessions.slot_tx import MAX_ATTEMPTS, Guard, NeedsTheSlot, ServiceHooks, SlotTx

log = logging.getLogger(__name__)

T = TypeVar("T")


class SlotTransactions:
    """Runs slot transactions, safe with many processes at once: the base of the session
    service, which sets the attributes below (transfers, corrections and imports run
    their work through it)."""

    database: Database
    locks: SlotLocks
    settings: Settings
    hooks: ServiceHooks
    busy_slots: BusySlots  # slots where this process saw the last create wait in line

    # ---- the slot transaction --------------------------------------------------------
    def run_on_slot(
        self, account_id: str, shop_id: str, actor: str, work: Callable[[SlotTx], T], *,
        joins_line: bool = False,
    ) -> T:
        """Run `work` under the slot lock in one transaction, fenced, retried if stale.

        `joins_line`: `work` probably only joins the line of an occupied slot (a create
        on a slot where this process saw the last create wait, `busy_slots`). It is
        first tried without the slot lock, in a transaction holding the slot row shared:
        such requests run side by side, and a change of the slot (which holds that row
        exclusively) waits for them, or they for it. The first step that would change
        the slot (`NeedsTheSlot`), a lost race or a conflict rolls that attempt back
        and the operation runs as below. On SQLite (no row locks) it always runs
        below."""
        if joins_line and self.database.dialect != "sqlite":
            attempt = self._run_in_line(account_id, shop_id, actor, work)
            if attempt is not None:
                return attempt[0]
            self.busy_slots.forget((account_id, shop_id))
        last_error: Exception | None = None
        for attempt_no in range(MAX_ATTEMPTS):
            try:
                with self.database.unit_of_work(
                        under=self.locks.hold(account_id, shop_id), core_first=True) as uow:
                    tx = SlotTx(self, uow, account_id, shop_id, actor,
                                trust_slot_row=attempt_no == 0)
                    result = work(tx)
                    tx.write_records()
                    tx.fence.advance(tx.occupant_id())
                    uow.commit()
                return result
            except (FenceRejected, IntegrityError, OperationalError) as exc:
                if isinstance(exc, OperationalError) and not is_retryable_db_error(exc):
                    raise
                last_error = exc
                log.info("slot (%s, %s) attempt %d retried: %s", account_id, shop_id,
                         attempt_no + 1, exc.__class__.__name__)
                wait_a_little(attempt_no)
        if isinstance(last_error, FenceRejected):
            raise last_error
        raise ServiceUnavailable(
            f"slot ({account_id}, {shop_id}) stayed contended after {MAX_ATTEMPTS} attempts; "
            "retry later"
        ) from last_error

    def _run_in_line(
        self, account_id: str, shop_id: str, actor: str, work: Callable[[SlotTx], T]
    ) -> tuple[T] | None:
        """`work` in a shared slot transaction; None when it must run under the lock."""
        try:
            with self.database.unit_of_work(core_first=True) as uow:
                tx = SlotTx(self, uow, account_id, shop_id, actor, shared=True)
                try:
                    result = work(tx)
                except NeedsTheSlot:
                    return None  # nothing was written: the unit of work rolls back
                tx.write_records()
                uow.commit()
        except (IntegrityError, OperationalError) as exc:
            if isinstance(exc, OperationalError) and not is_retryable_db_error(exc):
                raise
            log.info("slot (%s, %s): joining the line raced (%s); under the lock now",
                     account_id, shop_id, exc.__class__.__name__)
            return None
        return (result,)

    def run_on_session(
        self,
        session_id: str,
        actor: str,
        work: Callable[[SlotTx, Session], T],
        guard: Guard | None = None,
    ) -> T:
        """Run `work` on one session under its slot lock. `guard(session)`, if given, runs
        first inside the same transaction and may raise to refuse the operation (the HTTP
        layer checks there who controls the session, so the check cannot go stale)."""
        account_id, shop_id = self.slot_of(session_id)

        def guarded(tx: SlotTx) -> T:
            session = tx.load(session_id)
            if guard is not None:
                guard(session)
            return work(tx, session)

        return self.run_on_slot(account_id, shop_id, actor, guarded)

    def slot_of(self, session_id: str) -> tuple[str, str]:
        with self.database.read() as db:
            row = db.execute(
                select(Session.account_id, Session.shop_id).where(
                    Session.session_id == session_id
                )
            ).one_or_none()
        if row is None:
            raise NotFound(f"session {session_id} not found")
        return row[0], row[1]

    def deadline_for(self, session: Session, now: datetime) -> datetime | None:
        """When the sweep times the session out (SPEC §3.7); None once terminal."""
        return deadline_after(self.settings, session, now)
