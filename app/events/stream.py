"""The live event stream (SPEC §12): the feed's events pushed as Server-Sent Events.

One `EventHub` per serving process tails the outbox for every stream it serves: a single
poller asks for `MAX(id)` every `poll_interval` (one indexed look-up, whatever the number
of streams) or is woken at once by a commit in the same process (the embedded default),
and when something is new it reads the new events once, through `read_feed` as an
admin — so the feed's hole rule decides what may be served: `head` only ever moves over
a prefix of the id sequence that can no longer change. The events it read stay in a
bounded buffer; each stream takes from it the ones after its own cursor that its client
may see, decided once per batch and per distinct client (admins and bots on the batch's
columns, the desk by `visible_events` in one query), so a thousand streams of one desk
cost one query per batch, not a thousand.

A stream (`EventSubscription`) resumes from a cursor through `read_feed` in the client's
scope (so every rule of the feed, the cursor-expiry check included, holds for the stream
too) until it is within the buffer, then follows the hub. It only ever emits ids above
its cursor, and both sources hand out gap-free prefixes, so nothing is missed and
nothing is repeated.

Plain Python: no Flask. Threads and conditions are the standard library's, which
gevent turns into greenlets in the `stream` process (gunicorn's gevent worker patches
them before the app is imported).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from app.db import Database, utcnow
from app.errors import StreamsFull
from app.events.feed import MAX_PAGE, SETTLE_SECONDS, EventView, read_feed, visible_events
from app.events.models import Event
from app.events.outbox import Audience

log = logging.getLogger(__name__)

KEEPALIVE_FRAME = b": keep-alive\n\n"
# Events kept in a hub's memory for streams to catch up from; a stream further behind
# reads the table through `read_feed` instead.
BUFFER_EVENTS = 20000
# How far back a starting hub looks for the last event that has settled.
START_SCAN = 1000


def event_frame(view: EventView) -> bytes:
    """One SSE frame: `id:`, `event:` and `data:` (the event's JSON as in the feed, one
    line: JSON escapes every newline inside strings)."""
    return (f"id: {view.event_id}\nevent: {view.type}\ndata: {view.model_dump_json()}\n\n"
            .encode())


def cursor_frame(cursor: int) -> bytes:
    """An `id:` line alone: the browser's EventSource stores it as the last event id (so a
    reconnect resumes from here) without dispatching an event."""
    return f"id: {cursor}\n\n".encode()


@dataclass(frozen=True)
class Viewer:
    client_id: str
    role: str


@dataclass
class _Buffered:
    event_id: int
    client_id: str | None
    audience: str
    frame: bytes


@dataclass
class Batch:
    """Events the hub read in one go (ids ascending), with who may see them: decided once
    per client on first asking, so the streams of one client share the work."""

    events: list[_Buffered]
    first_id: int
    last_id: int
    _visible: dict[Viewer, list[_Buffered]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def visible_to(self, database: Database, viewer: Viewer) -> list[_Buffered]:
        known = self._visible.get(viewer)
        if known is not None:
            return known
        with self._lock:
            known = self._visible.get(viewer)
            if known is None:
                known = self._decide(database, viewer)
                self._visible[viewer] = known
        return known

    def _decide(self, database: Database, viewer: Viewer) -> list[_Buffered]:
        """`visible_events`, the feed's rule. An admin sees all and a bot its own
        sessions' events addressed to their owner — decided here on the columns the batch
        holds (tests/api/test_event_stream.py holds both to the feed); the desk's rule
        needs the transfers table, so it is asked of the database, once per batch."""
        if viewer.role == "admin":
            return self.events
        if viewer.role == "bot":
            return [e for e in self.events
                    if e.client_id == viewer.client_id and e.audience == Audience.OWNER]
        with database.read() as db:
            ids = set(db.execute(
                select(Event.id).where(Event.id >= self.first_id, Event.id <= self.last_id,
                                       visible_events(viewer.client_id, viewer.role))
            ).scalars().all())
        return [e for e in self.events if e.event_id in ids]


class EventHub:
    """The process's one outbox poller and the recent events it read."""

    def __init__(self, database: Database, *, poll_interval: float, max_streams: int,
                 settle_seconds: float = SETTLE_SECONDS, buffer_events: int = BUFFER_EVENTS,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.database = database
        self.poll_interval = poll_interval
        self.max_streams = max_streams
        self.settle_seconds = settle_seconds
        self.buffer_events = buffer_events
        self.clock = clock
        self.head = 0  # every event up to here is in the buffer or below its floor
        self.floor = 0  # the buffer holds the events in (floor, head]
        self.streams = 0
        self._batches: deque[Batch] = deque()
        self._buffered = 0
        self._changed = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._started = False
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ---- the poller ----------------------------------------------------------------------
    def start(self) -> None:
        """Find the starting head and start the poller (once; later calls do nothing)."""
        with self._start_lock:
            if self._started:
                return
            self.head = self.floor = self._settled_head()
            self._advance()
            self._thread = threading.Thread(target=_poll, args=(weakref.ref(self),),
                                            name="event-hub", daemon=True)
            self._thread.start()
            self._started = True
            _running_hubs.add(self)

    def stop(self, *, wait: bool = True) -> None:
        """Stop the poller and end every stream waiting on this hub (their generators
        return, so a server shutting down is not held by them until its timeout)."""
        self._stop.set()
        self._wake.set()
        with self._changed:
            self._changed.notify_all()
        if wait and self._thread is not None:
            self._thread.join(5)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def wake(self) -> None:
        """Events were committed in this process: read them now, not at the next poll."""
        self._wake.set()

    def _settled_head(self) -> int:
        """The newest event id below which nothing can still commit: the last event older
        than the settle window (the feed's rule), looked for among the newest ones."""
        settled = self.clock() - timedelta(seconds=self.settle_seconds)
        with self.database.read() as db:
            rows = db.execute(select(Event.id, Event.occurred_at).order_by(Event.id.desc())
                              .limit(START_SCAN)).all()
        for event_id, occurred_at in rows:
            if occurred_at <= settled:
                return int(event_id)
        return max(0, int(rows[-1][0]) - 1) if rows else 0

    def poll_once(self) -> None:
        """Read the outbox if something is new (one `MAX(id)` look-up otherwise)."""
        if self._newest_id() > self.head:
            self._advance()

    def _newest_id(self) -> int:
        with self.database.read() as db:
            return int(db.execute(select(func.max(Event.id))).scalar_one() or 0)

    def _advance(self) -> None:
        """Read what follows `head` (as many pages as there are) and publish it."""
        while True:
            with self.database.read() as db:
                page = read_feed(db, client_id="", role="admin", after=self.head,
                                 limit=MAX_PAGE, now=self.clock(),
                                 settle_seconds=self.settle_seconds)
            if not page.items:
                return
            batch = Batch(
                events=[_Buffered(v.event_id, None, v.audience, event_frame(v))
                        for v in page.items],
                first_id=page.items[0].event_id, last_id=page.next,
            )
            self._fill_owners(batch)
            with self._changed:
                self._batches.append(batch)
                self._buffered += len(batch.events)
                while self._buffered > self.buffer_events and len(self._batches) > 1:
                    dropped = self._batches.popleft()
                    self._buffered -= len(dropped.events)
                    self.floor = dropped.last_id
                self.head = page.next
                self._changed.notify_all()
            if len(page.items) < MAX_PAGE:
                return

    def _fill_owners(self, batch: Batch) -> None:
        """The owning client of each event (the feed's view leaves it out; the bot's
        no-query shortcut needs it)."""
        with self.database.read() as db:
            owners = dict(db.execute(
                select(Event.id, Event.client_id)
                .where(Event.id >= batch.first_id, Event.id <= batch.last_id)).all())
        for event in batch.events:
            event.client_id = owners.get(event.event_id)

    # ---- what streams use ------------------------------------------------------------------
    def batches_after(self, cursor: int) -> tuple[list[Batch], int, int]:
        """The buffered batches with events after `cursor`, the head they reach and the
        buffer's floor (a cursor below the floor must catch up from the table)."""
        with self._changed:
            found: list[Batch] = []
            for batch in reversed(self._batches):  # newest first: a stream is rarely behind
                if batch.last_id <= cursor:
                    break
                found.append(batch)
            found.reverse()
            return found, self.head, self.floor

    def wait_past(self, cursor: int, timeout: float) -> bool:
        """Wait until the head moves past `cursor`; False when `timeout` passed first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.head <= cursor:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return False
                self._changed.wait(left)
            return True

    def open(self) -> None:
        """Count a new stream in (StreamsFull past `max_streams`)."""
        with self._changed:
            if self.streams >= self.max_streams:
                raise StreamsFull(f"this process serves {self.max_streams} streams at most")
            self.streams += 1

    def close(self) -> None:
        with self._changed:
            self.streams -= 1


_running_hubs: weakref.WeakSet[EventHub] = weakref.WeakSet()


def stop_all_hubs() -> None:
    """End every event stream of this process now: the server is shutting down. Its
    clients reconnect (to another process) and resume from their Last-Event-ID. Called
    from the web and stream processes' SIGTERM handling (`gunicorn.conf.py`)."""
    for hub in list(_running_hubs):
        hub.stop(wait=False)


def end_streams_on_sigterm() -> None:
    """In a gunicorn worker (its `post_worker_init` hook): on SIGTERM, end this process's
    streams at once, then let gunicorn's own handler stop the worker. Without it a
    graceful stop waits for every open stream until `graceful_timeout` (30 s for the
    web process). The hubs are stopped from a short thread: the handler itself takes
    no lock."""
    previous = signal.getsignal(signal.SIGTERM)

    def handle_term(signum: int, frame: Any) -> None:
        threading.Thread(target=stop_all_hubs, name="end-streams", daemon=True).start()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, handle_term)


def _poll(ref: weakref.ref[EventHub]) -> None:
    """The poller's loop. It holds the hub weakly, so a hub nobody uses any more (a
    test's app) is collected and its poller ends."""
    failures = 0
    while True:
        hub = ref()
        if hub is None or hub._stop.is_set():
            return
        wake, interval = hub._wake, hub.poll_interval * min(2 ** failures, 20)
        del hub
        wake.wait(interval)
        wake.clear()
        hub = ref()
        if hub is None or hub._stop.is_set():
            return
        try:
            hub.poll_once()
            failures = 0
        except Exception:
            failures += 1
            log.warning("event stream: reading the outbox failed (attempt %d)", failures,
                        exc_info=failures == 1)
        del hub


class EventSubscription:
    """One client's stream: catch-up through `read_feed`, then the hub's batches."""

    def __init__(self, hub: EventHub, viewer: Viewer, *, after: int | None,
                 keepalive: float) -> None:
        self.hub = hub
        self.viewer = viewer
        self.keepalive = keepalive
        self.pending: list[bytes] = []
        # No cursor: start at the newest event (what the hub has read so far).
        self.cursor = hub.head if after is None else after
        self.behind = after is not None

    def catch_up(self) -> None:
        """Read one page after the cursor from the table, in the client's scope. The
        view calls it once before answering, so a feed error (410 cursor expired, 503)
        is the answer's status instead of a broken stream."""
        _, head, _ = self.hub.batches_after(self.cursor)
        with self.hub.database.read() as db:
            page = read_feed(db, client_id=self.viewer.client_id, role=self.viewer.role,
                             after=self.cursor, limit=MAX_PAGE, now=self.hub.clock(),
                             settle_seconds=self.hub.settle_seconds)
        self.pending.extend(event_frame(v) for v in page.items if v.event_id > self.cursor)
        self.cursor = max(self.cursor, page.next)
        if len(page.items) < MAX_PAGE:
            # Everything visible up to the head read before the query has been served:
            # the head is a settled prefix, so nothing below it can still appear.
            self.cursor = max(self.cursor, head)
            self.behind = False

    def frames(self) -> Iterator[bytes]:
        """The stream's bytes: a cursor line, then events and keep-alives, until the
        hub stops (the process is shutting down)."""
        yield cursor_frame(self.cursor)
        while not self.hub.stopped:
            if self.pending:
                chunk, self.pending = b"".join(self.pending), []
                yield chunk
                continue
            batches, head, floor = self.hub.batches_after(self.cursor)
            if self.behind or self.cursor < floor:
                self.behind = True
                self.catch_up()
                continue
            if batches:
                last_sent = self.cursor
                for batch in batches:
                    for event in batch.visible_to(self.hub.database, self.viewer):
                        if event.event_id > self.cursor:
                            self.pending.append(event.frame)
                            last_sent = event.event_id
                self.cursor = max(self.cursor, head)
                if self.pending and self.cursor > last_sent:
                    # past events this client does not see: a reconnect need not re-read them
                    self.pending.append(cursor_frame(self.cursor))
                continue
            if not self.hub.wait_past(self.cursor, self.keepalive) and not self.hub.stopped:
                yield KEEPALIVE_FRAME
