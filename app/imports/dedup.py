"""De-duplication and the other reads of what is stored (SPEC §4 steps 2–3, 5): the
message ids already stored, the sessions a batch can touch, what its threading fields
point to, the slot a bare session_id names."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select, tuple_
from sqlalchemy.orm import Session as DbSession

from app.db import UTCDateTime
from app.imports.counts import ImportCounts
from app.imports.planning import Known
from app.imports.rows import Msg, Slot
from app.imports.segmenting import GroupingOptions, StoredLinks
from app.messages.models import Message
from app.sessions.enums import SessionStatus
from app.sessions.models import Session

ID_BATCH = 500
S = SessionStatus


def stored_ids(db: DbSession, ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(ids), ID_BATCH):
        batch = ids[i:i + ID_BATCH]
        found.update(db.execute(
            select(Message.message_id).where(Message.message_id.in_(batch))
        ).scalars())
    return found


@dataclass(frozen=True)
class TimeWindow:
    """The stored sessions a batch can touch: those that may overlap or continue within
    the gap `[since, until]` (its first message − gap … its last + gap), every open one,
    and those its rows name by `session_ids`. A slot with years of history then loads
    the few sessions around the batch, not all of them."""

    since: datetime
    until: datetime
    session_ids: tuple[str, ...] = ()

    @classmethod
    def around(cls, msgs: Iterable[Msg], gap: timedelta) -> TimeWindow | None:
        batch = list(msgs)
        if not batch:
            return None
        times = [m.sent_at for m in batch]
        named = sorted({m.session_id for m in batch if m.session_id})
        if len(named) > ID_BATCH:
            return None  # an odd batch: no window rather than a huge IN list
        return cls(min(times) - gap, max(times) + gap, tuple(named))


_TERMINAL = [str(status) for status in S if status.is_terminal]
_START = func.coalesce(Session.first_message_at, Session.activated_at, Session.created_at)
# A superset of `choose_target`'s test (`Known.of` gives start and end), built once.
_NEAR = or_(
    Session.status.not_in(_TERMINAL),
    and_(bindparam("window_until", type_=UTCDateTime()) >= _START,
         or_(Session.ended_at >= bindparam("window_since", type_=UTCDateTime()),
             Session.last_message_at >= bindparam("window_since"),
             bindparam("window_since") <= _START)),
)


def known_sessions(db: DbSession, slots: Iterable[Slot], *, lock: bool = False,
                   window: TimeWindow | None = None) -> dict[Slot, list[Session]]:
    """The stored sessions of exactly these slots (within `window`, when given). A
    row-value IN keeps the index ranges to one per slot (`account IN … AND shop IN …`
    asks for their cross product: 50 accounts × 200 shops are 10,000 index dives per
    batch)."""
    wanted = set(slots)
    ordered = sorted(wanted)
    result: dict[Slot, list[Session]] = defaultdict(list)
    near: Any = None
    params: dict[str, Any] = {}
    if window is not None:
        near = _NEAR
        if window.session_ids:
            near = or_(near, Session.session_id.in_(window.session_ids))
        params = {"window_since": window.since, "window_until": window.until}
    for i in range(0, len(ordered), ID_BATCH):
        stmt = select(Session).where(
            tuple_(Session.account_id, Session.shop_id).in_(ordered[i:i + ID_BATCH]),
            Session.merged_into.is_(None))  # a merged session holds nothing more (§11)
        if near is not None:
            stmt = stmt.where(near)
        if lock:
            stmt = stmt.with_for_update()
        for session in db.execute(stmt, params).scalars():
            if session.slot in wanted:  # byte-exact, whatever the collation pads
                result[session.slot].append(session)
    return result


def merged_since_read(db: DbSession, pks: Sequence[int]) -> list[Slot]:
    """The slots of those sessions (locked `FOR UPDATE` here) that an operator has merged
    into another since they were read without a lock (SPEC §11)."""
    if not pks:
        return []
    rows = db.execute(select(Session.account_id, Session.shop_id, Session.merged_into)
                      .where(Session.id.in_(sorted(set(pks)))).with_for_update()).all()
    return sorted({(row.account_id, row.shop_id) for row in rows if row.merged_into})


def fresh_messages(db: DbSession, slots: dict[Slot, list[Msg]], counts: ImportCounts,
                   *, probe: bool = False) -> dict[Slot, list[Msg]]:
    """Step 2 and 3: drop what is stored or repeated, order each slot by time.

    With `probe`, only each slot's first row is looked up; if none of them is stored
    the batch is taken as new, and the unique key on `message_id` refuses the insert
    if that was wrong (the caller then retries without `probe`). A re-upload, or an
    export overlapping an earlier one, is caught by the probe and looked up in full."""
    seen: set[str] = set()
    stored: set[str] = set()
    if probe:
        stored = stored_ids(db, [min(msgs, key=lambda m: m.line).message_id
                                 for msgs in slots.values() if msgs])
    if stored or not probe:
        stored = stored_ids(db, [m.message_id for msgs in slots.values() for m in msgs])
    result: dict[Slot, list[Msg]] = {}
    for slot, msgs in slots.items():
        keep = []
        for msg in sorted(msgs, key=lambda m: m.line):
            if msg.message_id in stored or msg.message_id in seen:
                counts.duplicates += 1
                continue
            seen.add(msg.message_id)
            keep.append(msg)
        if keep:
            keep.sort(key=lambda m: (m.sent_at, m.line))
            result[slot] = keep
    return result


def stored_links(db: DbSession, slots: dict[Slot, list[Msg]], options: GroupingOptions
                 ) -> dict[Slot, StoredLinks]:
    """What the slots' threading fields point to in storage (SPEC §4 a, b): the session
    of each stored message a `reply_to` names (of the same slot) and the session of each
    stored thread. Nothing is read for rows without threading fields, nor with
    grouping=gap. A session merged into another (`merged_into`, SPEC §11) is skipped: its
    messages, and so its replies, now belong to the other."""
    if options.grouping == "gap":
        return {}
    parents: set[str] = set()
    threads: set[tuple[str, str, str]] = set()
    for slot, msgs in slots.items():
        ids: set[str] | None = None
        for msg in msgs:
            if msg.thread_id:
                threads.add((slot[0], slot[1], msg.thread_id))
            if msg.reply_to:
                if ids is None:
                    ids = {m.message_id for m in msgs}
                if msg.reply_to not in ids:
                    parents.add(msg.reply_to)
    if not parents and not threads:
        return {}
    merged_into = getattr(Session, "merged_into", None)
    live = [merged_into.is_(None)] if merged_into is not None else []
    parent_pk: dict[str, int] = {}
    wanted = sorted(parents)
    for i in range(0, len(wanted), ID_BATCH):
        parent_pk.update((message_id, pk) for message_id, pk in db.execute(
            select(Message.message_id, Message.session_pk)
            .where(Message.message_id.in_(wanted[i:i + ID_BATCH]))))
    rows: dict[int, Session] = {}
    pks = sorted(set(parent_pk.values()))
    for i in range(0, len(pks), ID_BATCH):
        rows.update((s.id, s) for s in db.execute(
            select(Session).where(Session.id.in_(pks[i:i + ID_BATCH]), *live)).scalars())
    thread_pk: dict[tuple[str, str, str], int] = {}
    keys = sorted(threads)
    for i in range(0, len(keys), ID_BATCH):
        for session in db.execute(select(Session).where(
                tuple_(Session.account_id, Session.shop_id, Session.thread_id)
                .in_(keys[i:i + ID_BATCH]), Session.message_count > 0, *live)
                .order_by(Session.id)).scalars():
            key = (session.account_id, session.shop_id, session.thread_id or "")
            if key in threads:  # byte-exact, whatever the collation pads
                thread_pk[key] = session.id  # the latest session of the thread wins
                rows[session.id] = session
    links: dict[Slot, StoredLinks] = {}
    for slot, msgs in slots.items():
        link = StoredLinks()
        for msg in msgs:
            if msg.reply_to and msg.reply_to in parent_pk:
                parent = rows.get(parent_pk[msg.reply_to])
                if parent is not None and parent.slot == slot:
                    link.by_message[msg.reply_to] = parent.id
                    link.sessions.setdefault(parent.id, Known.of(parent))
            if msg.thread_id:
                pk = thread_pk.get((slot[0], slot[1], msg.thread_id))
                if pk is not None:
                    link.by_thread[msg.thread_id] = pk
                    link.sessions.setdefault(pk, Known.of(rows[pk]))
        if link.sessions:
            links[slot] = link
    return links


def resolve_session_slots(runtime: Any, session_ids: Sequence[str]) -> dict[str, Slot]:
    if not session_ids:
        return {}
    found: dict[str, Slot] = {}
    with runtime.database.read() as db:
        unique = sorted(set(session_ids))
        for i in range(0, len(unique), ID_BATCH):
            for sid, account, shop in db.execute(
                select(Session.session_id, Session.account_id, Session.shop_id)
                .where(Session.session_id.in_(unique[i:i + ID_BATCH]))
            ):
                found[sid] = (account, shop)
    return found
