"""The split's staging: the fences that keep a split that was taken over from staging
a row more (`SplitFence` for a job's split, `PartFence` for one part of it), and the
writer that stages the split's pieces on a thread of its own (`StagingWriter`)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy import update
from sqlalchemy.orm import Session as DbSession

from app.db import Database, affected_rows, utcnow
from app.imports.models import ImportJob, ImportSplitPart

SPLIT_HEARTBEAT = 10.0


class SplitTakenOver(Exception):
    """Another run of prepare took this job's split over; this one stops, unwritten."""


class _Claim:
    """A token a split run wrote on its row, refreshed with every write (`write`, in the
    write's own transaction) and, between writes, by `beat` now and then."""

    def __init__(self, database: Database, pk: int, token: str) -> None:
        self.database = database
        self.pk = pk
        self.token = token
        self._last = time.monotonic()

    def write(self, db: DbSession, staged_rows: int = 0) -> None:
        raise NotImplementedError

    def beat(self) -> None:
        """Between writes (while the upload is read), refresh the heartbeat now and then."""
        if time.monotonic() - self._last < SPLIT_HEARTBEAT:
            return
        with self.database.unit_of_work() as uow:
            self.write(uow.session)
            uow.commit()


class SplitFence(_Claim):
    """A split's claim on its job: the token it wrote when it began. Every write of the
    split checks the token in the same transaction (and refreshes the heartbeat), so a
    splitter that was taken over cannot stage a row more."""

    @property
    def job_pk(self) -> int:
        return self.pk

    def write(self, db: DbSession, staged_rows: int = 0) -> None:
        """In the caller's transaction, before its writes: count `staged_rows` and refresh
        the heartbeat iff the split is still ours (the job row stays locked till commit,
        so a take-over waits for this transaction, then deletes what it staged)."""
        result = db.execute(
            update(ImportJob)
            .where(ImportJob.id == self.job_pk, ImportJob.split_token == self.token)
            .values(staged_rows=ImportJob.staged_rows + staged_rows,
                    split_heartbeat_at=utcnow())
        )
        if affected_rows(result) != 1:
            raise SplitTakenOver(f"import job {self.job_pk}: split taken over by another run")
        self._last = time.monotonic()


class Fence(Protocol):
    """What a split checks with every write: `SplitFence` (the job's) or `PartFence`."""

    def write(self, db: DbSession, staged_rows: int = 0) -> None: ...

    def beat(self) -> None: ...


class PartFence(_Claim):
    """A split part's claim: the token its run wrote on the part's row. Like
    `SplitFence`, checked (and the heartbeat refreshed) in every write's transaction; a
    part of a job that failed meanwhile is refused too (the failure clears its token)."""

    @property
    def part_pk(self) -> int:
        return self.pk

    def write(self, db: DbSession, staged_rows: int = 0) -> None:
        result = db.execute(
            update(ImportSplitPart)
            .where(ImportSplitPart.id == self.part_pk, ImportSplitPart.token == self.token,
                   ImportSplitPart.status == "pending")
            .values(staged_rows=ImportSplitPart.staged_rows + staged_rows,
                    heartbeat_at=utcnow())
        )
        if affected_rows(result) != 1:
            raise SplitTakenOver(f"split part {self.part_pk}: taken over or ended")
        self._last = time.monotonic()


class StagingWriter:
    """The split's staged pieces, written on a thread of their own while the split reads
    on: compressing a batch (zlib lets go of the GIL) and its fenced INSERT overlap the
    parsing of the next rows, instead of the splitter waiting for them. One batch waits
    at most while another is written, so memory stays bounded; batches are written in
    the order given. The first error of a write (SplitTakenOver, the database away) is
    raised in the splitter at its next `put` or at `close`, and nothing after it is
    written."""

    def __init__(self, write: Callable[[Any], None]) -> None:
        self._write = write
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="import-staging", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (batch := self._queue.get()) is not _DONE:
            if self._error is None:
                try:
                    self._write(batch)
                except BaseException as exc:  # raised in the splitter's thread
                    self._error = exc

    def put(self, batch: Any) -> None:
        self._raise()
        self._queue.put(batch)

    def close(self) -> None:
        """Wait for every batch given; raise the first write's error, if any."""
        if self._thread.is_alive():
            self._queue.put(_DONE)
            self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop: batches not yet started are dropped, the one being written ends."""
        if not self._thread.is_alive():
            return
        self._error = self._error or SplitTakenOver("the split stopped")
        while True:  # make room: drop what waits (its rows were never staged)
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(_DONE)
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


_DONE = object()
