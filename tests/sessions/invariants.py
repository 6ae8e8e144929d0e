"""Checks of the slot invariant and the audit trail, shared by the race tests."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import func, select, text

from app.audit.models import Operation
from app.audit.trail import verify_chain
from app.runtime import Runtime
from app.sessions.models import Session, Slot


def double_occupants(runtime: Runtime) -> list[tuple[str, str, int]]:
    """Slots with more than one ACTIVE/TRANSFERRED session, read in one statement."""
    with runtime.database.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT account_id, shop_id, COUNT(*) FROM sessions "
                "WHERE status IN ('ACTIVE', 'TRANSFERRED') "
                "GROUP BY account_id, shop_id HAVING COUNT(*) > 1"
            )
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def check_final_state(runtime: Runtime) -> list[str]:
    """Every problem found in the final state (empty list = consistent)."""
    problems: list[str] = []
    if doubles := double_occupants(runtime):
        problems.append(f"two occupants: {doubles}")
    with runtime.database.read() as db:
        sessions = db.execute(select(Session)).scalars().all()
        slots = {(s.account_id, s.shop_id): s for s in db.execute(select(Slot)).scalars()}
        by_slot: dict[tuple[str, str], list[Session]] = defaultdict(list)
        for s in sessions:
            by_slot[s.slot].append(s)
            occupying = s.status in ("ACTIVE", "TRANSFERRED")
            if bool(s.holds_slot) != occupying:
                problems.append(f"{s.session_id} {s.status} holds_slot={s.holds_slot}")
        for key, members in by_slot.items():
            occupant = [s for s in members if s.status in ("ACTIVE", "TRANSFERRED")]
            waiting = [
                s
                for s in members
                if s.status == "PENDING" or (s.status == "PAUSED" and s.pause_cause != "owner")
            ]
            if not occupant and waiting:
                problems.append(f"slot {key} free while {len(waiting)} wait")
            expected = occupant[0].session_id if occupant else None
            if slots[key].occupant_session_id != expected:
                problems.append(
                    f"slot {key} guard says {slots[key].occupant_session_id}, "
                    f"sessions say {expected}"
                )
        last_ops = dict(
            db.execute(
                select(Operation.session_pk, func.max(Operation.id)).group_by(Operation.session_pk)
            ).all()
        )
        for s in sessions:
            rows = (
                db.execute(
                    select(Operation).where(Operation.session_pk == s.id).order_by(Operation.id)
                )
                .scalars()
                .all()
            )
            if not rows or rows[-1].id != last_ops.get(s.id):
                problems.append(f"{s.session_id} has no audit trail")
                continue
            if rows[-1].to_status != s.status:
                problems.append(
                    f"{s.session_id} audit ends at {rows[-1].to_status}, status is {s.status}"
                )
            current = None
            for row in rows:
                if row.from_status != current and row.operation != "create":
                    problems.append(f"{s.session_id} audit jumps {current}->{row.from_status}")
                    break
                current = row.to_status
            intact, bad_row, _ = verify_chain(db, s.id)
            if not intact:
                problems.append(f"{s.session_id} audit chain broken at row {bad_row}")
    return problems
