"""Builders for the import tests: export rows, files in each format, a synchronous run."""

from __future__ import annotations

import csv
import gzip
import io
import json
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from app.imports.service import ImportJobView, ImportService
from app.messages.models import Message
from app.runtime import Runtime
from app.sessions.models import Session

COLUMNS = ["message_id", "account_id", "shop_id", "sender_role", "sender_id", "content",
           "sent_at", "task_type"]


def row(shop: str, role: str, at: datetime, content: str = "", *, account: str = "acc-1",
        message_id: str | None = None, sender_id: str | None = None, **extra: Any
        ) -> dict[str, Any]:
    body = {"account_id": account, "shop_id": shop, "sender_role": role,
            "sender_id": sender_id or f"{role}-1", "content": content or f"{role} at {at:%H:%M}",
            "sent_at": at.isoformat()}
    if message_id:
        body["message_id"] = message_id
    body.update(extra)
    return body


def conversation(shop: str, start: datetime, roles: str, *, step: timedelta = timedelta(minutes=1),
                 **kw: Any) -> list[dict[str, Any]]:
    """`roles` like "crh": counterpart, robot, human — one message per `step`."""
    names = {"c": "counterpart", "r": "robot", "h": "human", "s": "system"}
    return [row(shop, names[ch], start + i * step, f"{names[ch]} {i}", **kw)
            for i, ch in enumerate(roles)]


def as_ndjson(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def as_json(rows: list[dict[str, Any]]) -> bytes:
    return ("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n").encode()


def as_csv(rows: list[dict[str, Any]], encoding: str = "utf-8") -> bytes:
    out = io.StringIO()
    columns = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode(encoding)


def gz(data: bytes) -> bytes:
    return gzip.compress(data)


def run_job(runtime: Runtime, data: bytes, filename: str | None = None, **kw: Any
            ) -> ImportJobView:
    """The whole pipeline in this process, step by step (the worker tests use Celery)."""
    service = ImportService(runtime)
    job = service.create_job(io.BytesIO(data), filename=filename, **kw)
    outcome = service.prepare(job.job_id)
    for chunk_pk in outcome.chunk_pks:
        service.process_chunk(chunk_pk)
    return service.finish(job.job_id)


def sessions_of(runtime: Runtime, shop: str | None = None, account: str = "acc-1"
                ) -> list[Session]:
    with runtime.database.read() as db:
        stmt = select(Session).order_by(Session.first_message_at, Session.id)
        if shop is not None:
            stmt = stmt.where(Session.account_id == account, Session.shop_id == shop)
        return list(db.execute(stmt).scalars())


def messages_of(runtime: Runtime, session_pk: int) -> list[Message]:
    with runtime.database.read() as db:
        return list(db.execute(select(Message).where(Message.session_pk == session_pk)
                               .order_by(Message.sent_at, Message.id)).scalars())


def message_count(runtime: Runtime) -> int:
    from sqlalchemy import func

    with runtime.database.read() as db:
        return db.execute(select(func.count()).select_from(Message)).scalar_one()
