"""Idempotency-Key for creates (SPEC §3.5 case 5: recovery after a network cut).

Protocol, per (client, key):

1. `claim` commits a placeholder row (`status_code = 0`) keyed by the primary key
   (client_id, key). Of two concurrent requests with the same key exactly one inserts
   it; the other sees the placeholder and waits (bounded) for the answer.
2. The owner runs the create and, inside the *same* transaction, `finish` turns the
   placeholder into the stored answer — the session and its answer commit together.
3. If the create fails (409 reject, 503, …) `release` deletes the placeholder, so a
   retry with the same key is evaluated afresh: only successful answers are kept.

A later request with the same key and the same body gets the stored answer (nothing
new is created); with another body it gets 409 `/problems/idempotency-key-reuse`.
A placeholder left behind by a crashed process is taken over after `stale_after`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DbSession

from app.clients.models import IdempotencyRecord
from app.db import Database, affected_rows, utcnow
from app.errors import Conflict, IdempotencyMismatch, ServiceUnavailable, ValidationFailed

IN_PROGRESS = 0
MAX_KEY_LENGTH = 255


class KeyInProgress(ServiceUnavailable):
    """Another request with the same key is still running; retry shortly."""

    status = 409
    type = "/problems/idempotency-key-in-progress"
    title = "A request with this Idempotency-Key is in progress"


@dataclass(frozen=True)
class StoredAnswer:
    status_code: int
    body: Any


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


class IdempotencyStore:
    def __init__(
        self, database: Database, *, wait_seconds: float = 10.0, stale_after: float = 30.0
    ) -> None:
        self.database = database
        self.wait_seconds = wait_seconds
        self.stale_after = stale_after

    def claim(self, client_id: str, key: str, fingerprint: str) -> StoredAnswer | None:
        """None: this request now owns the key (finish or release it). Otherwise the answer
        stored for the key. Raises IdempotencyMismatch or KeyInProgress."""
        deadline = time.monotonic() + self.wait_seconds
        pause = 0.01
        while True:
            answer = self._try_claim(client_id, key, fingerprint)
            if answer is not None and answer.status_code == IN_PROGRESS:
                if time.monotonic() >= deadline:
                    raise KeyInProgress(
                        f"a request with Idempotency-Key {key!r} is still being processed; "
                        "retry shortly"
                    )
                time.sleep(pause)
                pause = min(pause * 2, 0.2)
                continue
            return answer

    def _try_claim(self, client_id: str, key: str, fingerprint: str) -> StoredAnswer | None:
        now = utcnow()
        with self.database.unit_of_work() as uow:
            record = uow.session.get(IdempotencyRecord, (client_id, key))
            if record is None:
                uow.session.add(
                    IdempotencyRecord(client_id=client_id, key=key, request_hash=fingerprint,
                                      status_code=IN_PROGRESS, response={}, created_at=now)
                )
                try:
                    uow.commit()
                except IntegrityError:
                    return StoredAnswer(IN_PROGRESS, None)  # claimed concurrently: look again
                return None
            if record.request_hash != fingerprint:
                raise IdempotencyMismatch(
                    f"Idempotency-Key {key!r} was already used with a different request",
                    key=key,
                )
            if record.status_code != IN_PROGRESS:
                return StoredAnswer(record.status_code, record.response)
            if record.created_at < now - timedelta(seconds=self.stale_after):
                taken = uow.session.execute(
                    update(IdempotencyRecord)
                    .where(IdempotencyRecord.client_id == client_id,
                           IdempotencyRecord.key == key,
                           IdempotencyRecord.status_code == IN_PROGRESS,
                           IdempotencyRecord.created_at == record.created_at)
                    .values(created_at=now)
                    .execution_options(synchronize_session=False)
                )
                uow.commit()
                if affected_rows(taken) == 1:
                    return None
            return StoredAnswer(IN_PROGRESS, None)

    @staticmethod
    def finish(db: DbSession, client_id: str, key: str, status_code: int, body: Any) -> None:
        """Store the answer in the caller's transaction (the one that creates)."""
        stored = db.execute(
            update(IdempotencyRecord)
            .where(IdempotencyRecord.client_id == client_id,
                   IdempotencyRecord.key == key,
                   IdempotencyRecord.status_code == IN_PROGRESS)
            .values(status_code=status_code, response=body)
            .execution_options(synchronize_session=False)
        )
        if affected_rows(stored) != 1:
            raise Conflict(
                f"Idempotency-Key {key!r} was taken over by another request; retry",
                key=key,
            )

    def release(self, client_id: str, key: str) -> None:
        """Forget an unfinished claim (the request failed; a retry starts afresh)."""
        with self.database.unit_of_work() as uow:
            uow.session.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.client_id == client_id,
                    IdempotencyRecord.key == key,
                    IdempotencyRecord.status_code == IN_PROGRESS,
                )
            )
            uow.commit()

    def purge(self, *, older_than: timedelta, batch: int = 5000) -> int:
        """Delete answers stored more than `older_than` ago, in batches of about `batch`
        rows (each its own short transaction, oldest first, along the created_at index),
        so that a large backlog never holds one long delete; returns the count.

        Unfinished claims go too: past the cutoff they are long stale (`stale_after`)."""
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
