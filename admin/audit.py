"""The audit log for operators (SPEC §7): search, and verification of the hash chains."""

from __future__ import annotations

import random
from typing import Any

from sqlalchemy import select, union
from sqlalchemy.orm import Session as DbSession

from admin.queries import MAX_VERIFY_SESSIONS, AuditSearch, VerifyRange
from admin.serializers import operation_json
from admin.sessions import load_session
from app.audit.models import Operation
from app.audit.trail import check_chain
from app.sessions.models import Session


def search_audit(db: DbSession, search: AuditSearch) -> tuple[list[dict[str, Any]], int | None]:
    """Audit rows newest first; `next` is the last row id of the page."""
    stmt = select(Operation)
    if search.session_id:
        stmt = stmt.where(Operation.session_id == search.session_id)
    if search.actor:
        stmt = stmt.where(Operation.actor == search.actor)
    if search.operation:
        stmt = stmt.where(Operation.operation == search.operation)
    if search.created_from is not None:
        stmt = stmt.where(Operation.created_at >= search.created_from)
    if search.created_to is not None:
        stmt = stmt.where(Operation.created_at < search.created_to)
    if search.after:
        stmt = stmt.where(Operation.id < search.after)
    rows = db.execute(stmt.order_by(Operation.id.desc()).limit(search.limit + 1)).scalars().all()
    page = rows[: search.limit]
    return [operation_json(r) for r in page], (page[-1].id if len(rows) > search.limit else None)


# ---- the audit chain ---------------------------------------------------------------------
def verify_session_chain(db: DbSession, session_id: str) -> dict[str, Any]:
    session = load_session(db, session_id)
    check = check_chain(db, session.id)
    return {"session_id": session_id, "intact": check.intact,
            "first_bad_row_id": check.first_bad_row_id, "rows_checked": check.rows_checked,
            "head_matches": check.head_matches}


def verify_chains(db: DbSession, request: VerifyRange) -> dict[str, Any]:
    """Verify every session with audit rows in the range (up to `limit`), or a random
    `sample` of them. Answers which chains are broken and where."""
    by_rows = select(Operation.session_pk.label("session_pk"))
    # A session whose rows were all deleted has none in the range: its anchored head
    # still names it, found by when it was created.
    by_head = select(Session.id.label("session_pk")).where(Session.audit_head.is_not(None))
    if request.created_from is not None:
        by_rows = by_rows.where(Operation.created_at >= request.created_from)
        by_head = by_head.where(Session.created_at >= request.created_from)
    if request.created_to is not None:
        by_rows = by_rows.where(Operation.created_at < request.created_to)
        by_head = by_head.where(Session.created_at < request.created_to)
    candidates_of = union(by_rows, by_head).subquery()
    stmt = select(candidates_of.c.session_pk)
    if request.sample is not None:
        # A sample is drawn from the range's sessions; drawing happens in Python over
        # ids only, so it is the same SQL on SQLite and MySQL.
        candidates = list(db.execute(stmt.limit(MAX_VERIFY_SESSIONS * 10)).scalars())
        chosen = random.sample(candidates, min(request.sample, len(candidates)))
        truncated = False
    else:
        chosen = list(db.execute(stmt.order_by(candidates_of.c.session_pk)
                                 .limit(request.limit + 1)).scalars())
        truncated = len(chosen) > request.limit
        chosen = chosen[: request.limit]
    broken: list[dict[str, Any]] = []
    rows_checked = 0
    for session_pk in chosen:
        check = check_chain(db, session_pk)
        rows_checked += check.rows_checked
        if not check.intact:
            public_id = db.execute(
                select(Session.session_id).where(Session.id == session_pk)
            ).scalar_one_or_none()
            broken.append({"session_id": public_id,
                           "first_bad_row_id": check.first_bad_row_id,
                           "head_matches": check.head_matches})
    return {
        "intact": not broken,
        "sessions_checked": len(chosen),
        "rows_checked": rows_checked,
        "broken": broken,
        "truncated": truncated,
        "sampled": request.sample is not None,
    }
