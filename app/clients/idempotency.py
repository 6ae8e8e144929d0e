"""Idempotency-Key for creates (SPEC §3.5 case 5: recovery after a network cut).

The answer is stored in the *same* transaction as the session it describes, and the
primary key (client_id, key) is the arbiter — no placeholder row, so nothing can be
left "in progress" by a request that failed (a refused database, a 409, a crash):

1. `lookup` (outside any lock) answers a stored answer, raises
   `IdempotencyMismatch` for another body, or says nothing is stored yet.
2. The create runs, and inside its slot transaction `record` looks once more and
   inserts the answer. Two retries of the same request name the same slot, so the
   slot lock serialises them: the second one finds the first one's answer there and
   raises `IdempotentReplay`, which rolls its own work back. Two different bodies
   racing on different slots collide on the primary key; the slot transaction is
   retried and its second look finds the mismatch.
3. A create that fails stores nothing: a retry with the same key is evaluated afresh.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session as DbSession

from app.clients.models import IdempotencyRecord
from app.db import Database, affected_rows, utcnow
from app.errors import IdempotencyMismatch, ValidationFailed

STORED = 201
MAX_KEY_LENGTH = 255
_SELECT = select(IdempotencyRecord.request_hash, IdempotencyRecord.status_code,
                 IdempotencyRecord.response)
_INSERT = insert(IdempotencyRecord)


@dataclass(frozen=True)
class StoredAnswer:
    status_code: int
    body: Any


class IdempotentReplay(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside a create's transaction when the key's answer is already stored:
    the transaction rolls back and the caller answers `answer` instead."""

    def __init__(self, answer: StoredAnswer) -> None:
        super().__init__("idempotent replay")
        self.answer = answer


def request_fingerprint(*parts: Any) -> str:
    """A stable hash of what the request asks for (canonical JSON)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable() or not key.isascii():
        raise ValidationFailed(
            "invalid Idempotency-Key",
            errors=[{"field": "Idempotency-Key",
                     "message": f"1 to {MAX_KEY_LENGTH} printable ASCII characters"}],
        )
    return key


def _stored(db: DbSession, client_id: str, key: str, fingerprint: str) -> StoredAnswer | None:
    row = db.execute(_SELECT.where(IdempotencyRecord.client_id == client_id,
                                   IdempotencyRecord.key == key)).one_or_none()
    if row is None:
        return None
    if row.request_hash != fingerprint:
        raise IdempotencyMismatch(
            f"Idempotency-Key {key!r} was already used with a different request", key=key)
    return StoredAnswer(row.status_code, row.response)


class IdempotencyStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def lookup(self, client_id: str, key: str, fingerprint: str) -> StoredAnswer | None:
        """The answer stored for the key (raises IdempotencyMismatch for another body)."""
        with self.database.read() as db:
            return _stored(db, client_id, key, fingerprint)

    @staticmethod
    def record(db: DbSession, client_id: str, key: str, fingerprint: str, body: Any) -> None:
        """Store the answer in the create's own transaction, or raise `IdempotentReplay`
        when a concurrent retry stored it first (see the module docstring)."""
        answer = _stored(db, client_id, key, fingerprint)
        if answer is not None:
            raise IdempotentReplay(answer)
        db.connection().execute(_INSERT, {
            "client_id": client_id, "key": key, "request_hash": fingerprint,
            "status_code": STORED, "response": body, "created_at": utcnow()})

    def purge(self, *, older_than: timedelta, batch: int = 5000) -> int:
        """Delete answers stored more than `older_than` ago, in batches of about `batch`
        rows (each its own short transaction, oldest first, along the created_at index),
        so that a large backlog never holds one long delete; returns the count.

        """
        cutoff = utcnow() - older_than
        purged = 0
        while True:
            with self.database.unit_of_work() as uow:
                # The created_at of the batch's last row bounds the delete (portable: no
                # DELETE … LIMIT, which SQLite lacks); equal times may make it a few more.
                upto = uow.session.execute(
                    select(IdempotencyRecord.created_at)
                    .where(IdempotencyRecord.created_at < cutoff)
                    .order_by(IdempotencyRecord.created_at)
                    .offset(batch - 1).limit(1)
                ).scalar_one_or_none()
                condition = (IdempotencyRecord.created_at <= upto if upto is not None
                             else IdempotencyRecord.created_at < cutoff)
                result = uow.session.execute(
                    delete(IdempotencyRecord).where(condition)
                    .execution_options(synchronize_session=False)
                )
                uow.commit()
            purged += affected_rows(result)
            if upto is None:
                return purged
