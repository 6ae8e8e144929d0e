"""Append audit rows and verify a session's hash chain (SPEC §7).

Each row's hash covers its content and the previous row's hash for the same
session, so editing, inserting or deleting a row breaks the chain from there on. The
chain's head — the last row's hash — is anchored outside it, on the session row
(`sessions.audit_head`, written in the same transaction as every audit row), so
deleting the last rows, which leaves a shorter chain that is still consistent, is
seen too: the recomputed head no longer matches the anchor.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session as DbSession

from app.audit.models import Operation
from app.sessions.models import Session


def chain_hash(
    *,
    prev_hash: str | None,
    session_id: str,
    operation: str,
    from_status: str | None,
    to_status: str | None,
    actor: str,
    reason: str | None,
    details: Any,
    created_at: datetime,
) -> str:
    """The hash of one audit row: its content and the previous row's hash (`prev_hash`,
    None for a session's first row). Every writer of audit rows chains through here."""
    payload = json.dumps(
        [
            prev_hash,
            session_id,
            operation,
            from_status,
            to_status,
            actor,
            reason,
            details,
            created_at.isoformat(timespec="microseconds"),
        ],
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def last_hash(db: DbSession, session_pk: int) -> str | None:
    """The hash of the session's last audit row (None before its first), to chain to."""
    stmt = (
        select(Operation.row_hash)
        .where(Operation.session_pk == session_pk)
        .order_by(Operation.id.desc())
        .limit(1)
    )
    return db.execute(stmt).scalar_one_or_none()


@dataclass(frozen=True)
class ChainCheck:
    """A session's chain recomputed: `first_bad_row_id` is the first row whose hash or
    link is wrong; `head_matches` says whether the last row's hash is the anchored head
    (False with every row right: rows were deleted from the end)."""

    intact: bool
    first_bad_row_id: int | None
    rows_checked: int
    head_matches: bool


def check_chain(db: DbSession, session_pk: int) -> ChainCheck:
    """Recompute a session's chain and compare its end with the anchored head."""
    anchored = db.execute(
        select(Session.audit_head).where(Session.id == session_pk)
    ).scalar_one_or_none()
    rows = db.execute(
        select(Operation).where(Operation.session_pk == session_pk).order_by(Operation.id)
    ).scalars()
    prev: str | None = None
    count = 0
    for row in rows:
        count += 1
        expected = chain_hash(
            prev_hash=prev,
            session_id=row.session_id,
            operation=row.operation,
            from_status=row.from_status,
            to_status=row.to_status,
            actor=row.actor,
            reason=row.reason,
            details=row.details,
            created_at=row.created_at,
        )
        if row.prev_hash != prev or row.row_hash != expected:
            return ChainCheck(False, row.id, count, head_matches=False)
        prev = row.row_hash
    head_matches = prev == anchored
    return ChainCheck(head_matches, None, count, head_matches=head_matches)


def verify_chain(db: DbSession, session_pk: int) -> tuple[bool, int | None, int]:
    """Recompute a session's chain: (intact, id of the first bad row or None, rows
    checked); not intact with no bad row means the chain ends before its anchored head."""
    check = check_chain(db, session_pk)
    return check.intact, check.first_bad_row_id, check.rows_checked


def operation_values(
    *,
    session_pk: int,
    session_id: str,
    operation: str,
    from_status: str | None,
    to_status: str | None,
    actor: str,
    at: datetime,
    prev_hash: str | None,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The column values of one chained audit row, for bulk inserts (the history import
    writes thousands of sessions per transaction); `prev_hash` is the session's last
    row hash (None for a session created in the same batch)."""
    values: dict[str, Any] = {
        "session_pk": session_pk,
        "session_id": session_id,
        "operation": operation,
        "from_status": str(from_status) if from_status else None,
        "to_status": str(to_status) if to_status else None,
        "actor": actor,
        "reason": reason,
        "details": details,
        "created_at": at,
        "prev_hash": prev_hash,
    }
    values["row_hash"] = chain_hash(
        prev_hash=prev_hash, session_id=session_id, operation=operation,
        from_status=values["from_status"], to_status=values["to_status"], actor=actor,
        reason=reason, details=details, created_at=at,
    )
    return values


def last_hashes(db: DbSession, session_pks: list[int]) -> dict[int, str]:
    """The last row hash of each session in `session_pks` (as slot transactions chain
    to), in a few queries, for bulk writers; sessions without audit rows are absent."""
    found: dict[int, str] = {}
    for i in range(0, len(session_pks), 500):
        latest = (
            select(func.max(Operation.id))
            .where(Operation.session_pk.in_(session_pks[i:i + 500]))
            .group_by(Operation.session_pk)
        )
        found.update({pk: row_hash for pk, row_hash in db.execute(
            select(Operation.session_pk, Operation.row_hash).where(Operation.id.in_(latest))
        ).all()})
    return found
