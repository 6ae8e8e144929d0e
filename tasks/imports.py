"""History import tasks (SPEC §4): prepare → (one task per split part →) one task per
chunk → the job's close.

Every task takes ids, re-reads its state and is safe to run twice: prepare on a
split job re-dispatches the pending chunks, a chunk already marked done is a
no-op. A worker killed mid-chunk loses its transaction; the chunk is redelivered
(acks_late + reject on worker loss), or re-dispatched by `resume_unfinished_imports`
when a worker starts.

The job closes once. There is no chord (whose callback came on top of the last
chunk's own call, so every job was finished twice): each chunk task, after its
commit, counts the chunks still pending, and one that finds none closes the job
itself (`ImportService.close`: a conditional UPDATE claims the job in the close's
transaction, so of two chunks ending together one closes and the other finds it
closed). `imports.finish` remains for the cases no chunk task covers: a job split
into no chunk, a close that met the database away (retried), and recovery (prepare
on a job whose chunks are all done).

A big NDJSON upload is split by every worker: prepare scans it once (the one serial
pass: bytes, lines and line-aligned cut points) and cuts it into as many parts as a
worker machine has cores; each part is split by a task of its own into the same chunks
(by the hash of each row's slot), and the part task that finds no part left pending
makes the job's chunks (`ImportService.merge_parts`, once: under the job's row lock)
and sends them. A smaller upload, a CSV or a JSON array is split by prepare alone.

A chunk takes about `chunking.TASK_ROWS` rows (whole slots); BATCH_SIZE bounds the
rows of each INSERT it sends (SPEC §10: one database batch), not the task.

A job always ends: infrastructure errors are retried a bounded number of times, then
the step fails (a chunk after MAX_CHUNK_ATTEMPTS attempts, however they died; a split
or a close that keeps failing fails its job), and anything unexpected fails the step
at once with its reason.

On the embedded default (no Redis) Celery runs eagerly in-process; the upload
then runs the pipeline on a background thread so that it still answers at once
(`start_in_process`, the in-process dispatcher's `start_import`: `tasks.dispatch`).
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_ready
from sqlalchemy.exc import OperationalError

from app.errors import ServiceUnavailable
from app.imports.service import ImportService
from app.imports.splitting import SPLIT_LEASE
from app.observability.metrics import record_import_chunk
from app.runtime import get_runtime
from tasks.celery_app import celery, runs_in_process, schedule_every

log = logging.getLogger(__name__)

# Test-only: "<seconds>:<marker file>" makes a chunk sleep after writing its rows and
# before committing, after touching the marker file (the worker-kill test uses it).
PAUSE_ENV = "AUTO_SESSION_IMPORT_PAUSE_BEFORE_COMMIT"
RETRYABLE = (OperationalError, ServiceUnavailable)
CHUNK_TIME_LIMIT = 900  # seconds a chunk task may run (the soft limit a minute earlier)
# A job with no sign of life for longer than a chunk task may run has nothing running:
# `resume_stalled_imports` sends it again. The beat looks every STALL_CHECK_INTERVAL.
STALLED_AFTER = CHUNK_TIME_LIMIT + 60
STALL_CHECK_INTERVAL = 300.0
# A chunk that ran out of time is retried too: a paged chunk goes on after the last page
# it stored, and the chunk's attempt count bounds how often.
CHUNK_RETRYABLE = (*RETRYABLE, SoftTimeLimitExceeded)


def service() -> ImportService:
    # As many split parts as the worker machine has cores: the worker runs that many
    # processes at the shipped default (`--concurrency $(nproc)`).
    return ImportService(get_runtime(), split_parts=os.cpu_count() or 1)


@celery.task(name="imports.prepare", bind=True, acks_late=True, time_limit=3600,
             soft_time_limit=3500, max_retries=5)
def prepare_import_task(self: Any, job_id: str) -> dict[str, Any]:
    """Split the staged upload into chunks, then send one task per chunk.
    If another run is splitting the job right now, look again once its lease could have
    run out (it dispatches the chunks itself if it finishes; if it died, this takes over).
    The database or Redis away: retried with backoff, then the job fails."""
    svc = service()
    try:
        outcome = svc.prepare(job_id)
    except RETRYABLE as exc:
        if self.request.retries < self.max_retries and not runs_in_process():
            raise self.retry(exc=exc, countdown=min(60, 2 ** (self.request.retries + 1))
                             ) from exc
        svc.fail_job(job_id, f"the upload could not be split: {type(exc).__name__}: {exc}")
        return {"job_id": job_id, "chunks": 0, "failed": True}
    if outcome.retry_in is not None and not runs_in_process():
        prepare_import_task.apply_async((job_id,), countdown=outcome.retry_in + 1)
    dispatch_parts(job_id, outcome.part_pks)
    dispatch_chunks(job_id, outcome.chunk_pks, ready_to_finish=outcome.ready_to_finish)
    return {"job_id": job_id, "chunks": len(outcome.chunk_pks),
            "parts": len(outcome.part_pks), "split_elsewhere": outcome.retry_in is not None,
            "retry_in": outcome.retry_in}


@celery.task(name="imports.split_part", bind=True, acks_late=True, time_limit=3600,
             soft_time_limit=3500, max_retries=5, ignore_result=True)
def split_part_task(self: Any, job_id: str, part_pk: int) -> dict[str, Any]:
    """Split one part of the upload; then, if no part is left pending, make the job's
    chunks and send them (once: `merge_parts`). A part another run is splitting is
    looked at again once its lease could have run out. The database away: retried with
    backoff, then the job fails."""
    svc = service()
    try:
        outcome = svc.split_part(job_id, part_pk)
        if outcome.retry_in is not None:
            if not runs_in_process():
                split_part_task.apply_async((job_id, part_pk), countdown=outcome.retry_in + 1)
            return {"part": part_pk, "split_elsewhere": True}
        merged = svc.merge_parts(job_id) if svc.parts_left(job_id) == 0 else None
    except RETRYABLE as exc:
        if self.request.retries < self.max_retries and not runs_in_process():
            raise self.retry(exc=exc, countdown=min(60, 2 ** (self.request.retries + 1))
                             ) from exc
        svc.fail_job(job_id, f"the upload could not be split: {type(exc).__name__}: {exc}")
        return {"part": part_pk, "failed": True}
    if merged is not None:
        dispatch_chunks(job_id, merged.chunk_pks, ready_to_finish=merged.ready_to_finish)
    return {"part": part_pk, "chunks": len(merged.chunk_pks) if merged else None}


@celery.task(name="imports.chunk", bind=True, acks_late=True, time_limit=CHUNK_TIME_LIMIT,
             soft_time_limit=CHUNK_TIME_LIMIT - 60, max_retries=5, ignore_result=True)
def import_chunk_task(self: Any, job_id: str, chunk_pk: int) -> dict[str, Any]:
    """One chunk (one transaction, or time-ordered pages of a huge one); then, if no
    chunk is left pending, the job's close. Infrastructure errors and time-outs are
    retried with backoff; anything else, or too many retries, marks the chunk failed so
    the job can close."""
    svc = service()
    started = time.perf_counter()
    try:
        try:
            counts = svc.process_chunk(chunk_pk, after_write=_test_pause())
        except CHUNK_RETRYABLE as exc:
            if self.request.retries < self.max_retries and not runs_in_process():
                raise self.retry(exc=exc, countdown=min(60, 2 ** self.request.retries)
                                 ) from exc
            svc.fail_chunk(chunk_pk, f"{type(exc).__name__}: {exc}")
            counts = None
        except Exception as exc:
            log.exception("import chunk %s failed", chunk_pk)
            svc.fail_chunk(chunk_pk, f"{type(exc).__name__}: {exc}")
            counts = None
        record_import_chunk(counts, time.perf_counter() - started)
        left = svc.chunks_left(job_id)
    except RETRYABLE as exc:  # could not even record the failure: try the whole task again
        if self.request.retries < self.max_retries and not runs_in_process():
            raise self.retry(exc=exc, countdown=min(60, 2 ** self.request.retries)) from exc
        raise
    closed = None
    if left == 0:  # none pending after this one's commit: the job can close (once)
        try:
            closed = close_job(svc, job_id)
        except RETRYABLE:  # the database is away: the finish task retries the close
            finish_import_task.apply_async(kwargs={"job_id": job_id}, countdown=2)
    return {"chunk": chunk_pk, "inserted": counts.inserted if counts else None,
            "closed": closed}


def close_job(svc: ImportService, job_id: str) -> str | None:
    """Close the job if it can be and nobody else did: its status, or None. A close that
    fails for another reason than the database being away fails the job."""
    try:
        view = svc.close(job_id)
    except RETRYABLE:
        raise
    except Exception as exc:
        log.exception("import %s could not be closed", job_id)
        svc.fail_job(job_id, f"the job could not be closed: {type(exc).__name__}: {exc}")
        return "failed"
    if view is None:
        return None
    log.info("import %s finished: %s, %d inserted, %d duplicates, %d invalid", job_id,
             view.status, view.inserted, view.duplicates, view.invalid)
    return view.status


@celery.task(name="imports.finish", acks_late=True, time_limit=600, soft_time_limit=540,
             autoretry_for=RETRYABLE, retry_backoff=True, max_retries=5, ignore_result=True)
def finish_import_task(*_results: Any, job_id: str | None = None) -> dict[str, Any]:
    """Close the job if every chunk is done and nobody closed it (safe to call again:
    a job closes once). Sent when no chunk task will close the job: a job of no chunk,
    a close that met the database away, recovery."""
    assert job_id is not None
    return {"job_id": job_id, "closed": close_job(service(), job_id)}


@celery.task(name="imports.resume", acks_late=True, time_limit=600, soft_time_limit=540)
def resume_unfinished_imports() -> list[str]:
    """Re-dispatch every unfinished job: a queued job is split, a running one gets its
    pending chunks sent again (harmless if they are still queued: done is done)."""
    jobs = service().unfinished()
    for job_id in jobs:
        prepare_import_task.delay(job_id)
    return jobs


@celery.task(name="imports.resume_stalled", acks_late=True, time_limit=600,
             soft_time_limit=540)
def resume_stalled_imports() -> list[str]:
    """The beat's safety net for lost tasks: a job that showed no sign of life for
    STALLED_AFTER (no chunk run started or ended, no split heartbeat; longer than a chunk
    task may run, so none is running) lost its tasks — a broker restarted without its
    data drops every task still queued, and workers that stay up never resume — and is
    sent again (prepare sends whatever is pending), once per STALLED_AFTER at most."""
    jobs = service().take_stalled(timedelta(seconds=STALLED_AFTER))
    for job_id in jobs:
        log.warning("import %s showed no sign of life for %d s: sending it again", job_id,
                    STALLED_AFTER)
        prepare_import_task.delay(job_id)
    return jobs


schedule_every("resume-stalled-imports", "imports.resume_stalled", STALL_CHECK_INTERVAL)


def dispatch_parts(job_id: str, part_pks: list[int]) -> None:
    """One task per split part (the last one to end sends the chunks)."""
    for pk in part_pks:
        split_part_task.apply_async((job_id, pk))


def dispatch_chunks(job_id: str, chunk_pks: list[int], *, ready_to_finish: bool) -> None:
    """One task per chunk (the last one to end closes the job), or the close alone."""
    for pk in chunk_pks:
        import_chunk_task.apply_async((job_id, pk))
    if not chunk_pks and ready_to_finish:
        finish_import_task.delay(job_id=job_id)


def start_in_process(job_id: str) -> None:
    """Embedded default: run a staged job's pipeline on a thread of this process (the
    in-process dispatcher's `start_import`), so that the upload still answers at once."""
    # in the caller's context: its trace id goes on in the pipeline's log lines
    thread = threading.Thread(target=contextvars.copy_context().run,
                              args=(_run_eagerly, job_id), daemon=True,
                              name=f"import-{job_id}")
    thread.start()
    _eager_threads[job_id] = thread


def wait_eager(job_id: str, timeout: float | None = None) -> None:
    """Embedded default: wait for the in-process pipeline of `job_id` (CLI, tests)."""
    thread = _eager_threads.get(job_id)
    if thread is not None:
        thread.join(timeout)


_eager_threads: dict[str, threading.Thread] = {}


def resume_in_process() -> list[str]:
    """Embedded default: run again, each on a thread of this process, the jobs left
    unfinished (a server stopped or killed in the middle of an import: its pipeline ran
    on threads of that process and died with it). What a starting Celery worker does
    with `resume_unfinished_imports`; the in-process beat calls it once as it starts.
    A job already running in this process is left to its thread."""
    jobs = [job_id for job_id in service().unfinished() if job_id not in _eager_threads]
    for job_id in jobs:
        log.info("import %s was left unfinished: resuming it in this process", job_id)
        start_in_process(job_id)
    return jobs


# A pass that leaves its job unfinished met a split lease held elsewhere (a run that
# died, or another process's): look again when it could have run out, so many times.
EAGER_PASSES = 10


def _run_eagerly(job_id: str) -> None:
    try:
        for _pass in range(EAGER_PASSES):
            # its chunks close the job
            outcome = prepare_import_task.apply(args=(job_id,), throw=True).result
            close_job(service(), job_id)  # a job of no chunk, or a close that met an error
            if service().get(job_id).finished:
                return
            retry_in = outcome.get("retry_in") if isinstance(outcome, dict) else None
            time.sleep(min(SPLIT_LEASE, retry_in + 1) if retry_in else SPLIT_LEASE / 4)
        log.warning("import %s still unfinished after %d passes in this process; it is "
                    "resumed at the next start", job_id, EAGER_PASSES)
    except Exception as exc:
        log.exception("import %s failed in-process", job_id)
        try:  # the job must end, whatever went wrong
            service().fail_job(job_id, f"the import failed: {type(exc).__name__}: {exc}")
        except Exception:
            log.exception("import %s could not be marked failed", job_id)
    finally:
        _eager_threads.pop(job_id, None)


def _test_pause() -> Callable[[], None] | None:
    setting = os.environ.get(PAUSE_ENV)
    if not setting:
        return None
    seconds, _, marker = setting.partition(":")

    def pause() -> None:
        if marker:
            Path(marker).write_text(str(os.getpid()))
        time.sleep(float(seconds))

    return pause


@worker_ready.connect
def _resume_on_start(**_kwargs: Any) -> None:
    """A worker that starts picks up jobs left unfinished by a worker that died."""
    try:
        resume_unfinished_imports.delay()
    except Exception:  # the broker may not be ready; the next start or a manual run will
        log.exception("could not schedule the import resume")
