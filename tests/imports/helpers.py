"""Builders for the import tests: export rows, files in each format, a synchronous run."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.imports.lifecycle import ImportJobView
from app.imports.service import ImportService
from app.messages.models import Message
from app.runtime import Runtime
from app.sessions.models import Session

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

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


# ---- hostile inputs --------------------------------------------------------------------
def gzip_of_repeated(block: bytes, total: int, level: int = 6) -> bytes:
    """A gzip stream that inflates to `total` bytes of `block` repeated, built a block at
    a time (the expanded bytes are never held: a bomb stays small in the test too)."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=level) as archive:
        written = 0
        while written < total:
            archive.write(block)
            written += len(block)
    return out.getvalue()


def staged_left(runtime: Runtime, job_id: str) -> tuple[int, int]:
    """(upload pieces, staged row pieces) still kept for a job."""
    from sqlalchemy import func

    from app.imports.models import ImportChunkPart, ImportJob, ImportUploadPart

    with runtime.database.read() as db:
        job_pk = db.execute(select(ImportJob.id).where(ImportJob.job_id == job_id)
                            ).scalar_one()
        return (
            db.execute(select(func.count()).select_from(ImportUploadPart)
                       .where(ImportUploadPart.job_pk == job_pk)).scalar_one(),
            db.execute(select(func.count()).select_from(ImportChunkPart)
                       .where(ImportChunkPart.job_pk == job_pk)).scalar_one(),
        )


def stored_by_job(runtime: Runtime, job_id: str) -> int:
    from sqlalchemy import func

    with runtime.database.read() as db:
        return db.execute(select(func.count()).select_from(Message)
                          .where(Message.import_job_id == job_id)).scalar_one()


# ---- real workers (MariaDB + Redis tests) -------------------------------------------------
def start_worker(env: dict[str, str], log: Path, name: str, *,
                 memory_cap: int | None = None) -> subprocess.Popen:
    """A Celery worker (one prefork child) in its own process group; `memory_cap` bounds
    its address space (RLIMIT_AS), so a leak fails its task instead of the machine."""
    def limit() -> None:
        if memory_cap is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_cap, memory_cap))

    return subprocess.Popen(
        [str(BIN / "celery"), "-A", "tasks.celery_app:celery", "worker", "--loglevel", "INFO",
         "--concurrency", "1", "--pool", "prefork", "-n", f"{name}@127.0.0.1",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=limit,
    )


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    import pytest

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; worker log:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def peak_rss_of_group(pgid: int) -> int:
    """The largest peak resident size (VmHWM, bytes) among the processes of a group."""
    peak = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            for status_line in (entry / "status").read_text().splitlines():
                if status_line.startswith("VmHWM:"):
                    peak = max(peak, int(status_line.split()[1]) * 1024)
        except (OSError, ValueError):
            continue
    return peak
