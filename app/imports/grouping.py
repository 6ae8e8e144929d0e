"""Grouping imported messages into sessions: SPEC §4 steps 2–7, one slot at a time.

For every slot (account_id, shop_id) of a batch:

1. drop messages already stored or repeated in the batch (by message_id),
2. order by time and segment (`app.imports.segmenting`, a pipeline of replaceable
   steps: threads, reply chains, the gap rule at the job's `session_gap`, the LLM
   review's verdicts — asked for before the transaction, `review_boundaries`); what the
   threading fields point to in storage is looked up first (`stored_links`),
3. plan each segment (`plan_slot`, pure): attach it to the session it continues (by
   session_id, thread or reply), else to an existing session it overlaps or continues
   within the gap (open sessions only, for a threaded one), or create a session
   (`origin=import`, recording `started_by` and `thread_id`,
   typed by our side's first sender; a robot→staff segment is a hand-off with a
   transfer record, trigger `history`), or — staff talking on a slot whose robot
   session is ACTIVE — the seed's "人工自由" case 1,
4. apply the plan. Slots whose plan only touches the past (closed segments,
   ended sessions) are written in bulk in the caller's transaction, without
   events. Slots with anything live (a segment that ended less than SESSION_GAP
   ago, an open session, a conflict) go through `SessionService.run_on_slot`, so
   the slot lock, the fence and the §3.5 rules apply exactly as for a request.

Every session touched gets an audit row by `system:import`.

The rows of a batch are written by executemany in database batches of at most
`BatchContext.batch_rows` rows each — BATCH_SIZE, the seed's 批处理大小 (SPEC §10:
it bounds one database batch) — whatever the number of rows one worker task takes
(`app.imports.chunking.TASK_ROWS`), which is the project's choice.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import and_, bindparam, func, or_, select, tuple_
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session as DbSession

from app.audit.models import Operation
from app.audit.trail import last_hashes, operation_values
from app.db import UnitOfWork, UTCDateTime, is_retryable_db_error, utcnow
from app.ids import new_id
from app.imports.review import CONTEXT_MESSAGES as REVIEW_CONTEXT
from app.imports.review import BoundaryReviewer, ReviewOutcome
from app.imports.rows import MAX_THREAD_ID, ROLE_ALIASES, ChatRow, parse_time, row_error_text
from app.imports.segmenting import (
    NO_LINKS,
    Boundary,
    GroupingOptions,
    Segment,
    Segmenter,
    StartedBy,
    StoredLinks,
    review_candidates,
    segment_slot,
    split_at_gaps,
)
from app.messages.models import Message
from app.sessions import rules
from app.sessions.enums import Origin, Priority, SenderRole, SessionStatus, SessionType, TaskType
from app.sessions.models import Session
from app.transfers.enums import TransferStatus, TransferTrigger
from app.transfers.models import Transfer
from app.transfers.schemas import TransferRequest
from app.validation import EARLIEST_TIME, LATEST_AHEAD

log = logging.getLogger(__name__)

ACTOR = "system:import"
MAX_CONTENT_BYTES = 65535  # MySQL TEXT; longer rows are refused, never truncated
ID_BATCH = 500
BULK_ATTEMPTS = 5
S = SessionStatus
OUR_SIDE = (SenderRole.ROBOT, SenderRole.HUMAN)
Slot = tuple[str, str]


# ---- values ---------------------------------------------------------------------------
@dataclass
class ImportCounts:
    """What a batch did; `inserted + duplicates + invalid` is every row it was given."""

    inserted: int = 0
    duplicates: int = 0
    invalid: int = 0
    sessions_created: int = 0
    sessions_updated: int = 0
    conflicts: int = 0
    # LLM review (SPEC §4d): boundaries that got a verdict, and those merged by it
    boundaries_reviewed: int = 0
    boundaries_merged: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    COUNTERS = ("inserted", "duplicates", "invalid", "sessions_created", "sessions_updated",
                "conflicts", "boundaries_reviewed", "boundaries_merged")

    def add(self, other: ImportCounts) -> None:
        for name in self.COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors.extend(other.errors)

    def error(self, line: int, text: str) -> None:
        self.invalid += 1
        self.errors.append({"line": line, "error": text})

    def as_dict(self, max_errors: int = 100) -> dict[str, Any]:
        body: dict[str, Any] = {name: getattr(self, name) for name in self.COUNTERS}
        body["errors"] = sorted(self.errors, key=lambda e: e["line"])[:max_errors]
        return body

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImportCounts:
        counts = cls()
        for name in cls.COUNTERS:
            setattr(counts, name, int(data.get(name, 0)))
        counts.errors = list(data.get("errors") or [])
        return counts


@dataclass(slots=True)
class Msg:
    """A validated row on its way to the messages table."""

    line: int
    message_id: str
    account_id: str
    shop_id: str
    sender_role: SenderRole
    sender_id: str | None
    content: str
    message_type: str
    sent_at: datetime
    session_id: str | None
    task_type: TaskType | None
    reply_to: str | None = None
    thread_id: str | None = None

    @classmethod
    def from_row(cls, line: int, row: ChatRow) -> Msg:
        return cls(
            line=line, message_id=row.message_id or "", account_id=row.account_id or "",
            shop_id=row.shop_id or "", sender_role=SenderRole(str(row.sender_role)),
            sender_id=row.sender_id, content=row.content, message_type=row.message_type,
            sent_at=row.sent_at, session_id=row.session_id, task_type=row.task_type,
            reply_to=row.reply_to, thread_id=row.thread_id,
        )


def validate_row(line: int, fields: dict[str, Any], tz: Any, *,
                 latest: datetime | None = None) -> Msg | str:
    """A `Msg`, or the reason the row is refused (naming the field). `latest` is the
    newest time accepted (default: now + 1 day); the import pins it to the job's start
    so that a retried chunk judges every row as the first attempt did."""
    bound = latest if latest is not None else utcnow() + LATEST_AHEAD
    msg = plain_msg(line, fields, tz, latest=bound)
    if msg is None:
        try:
            row = ChatRow.model_validate(fields, context={"tz": tz})
        except ValidationError as exc:
            return row_error_text(exc)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            return f"row: {type(exc).__name__}: {str(exc)[:200]}"
        msg = Msg.from_row(line, row)
        if msg.sent_at > bound:
            return (f"sent_at: time {msg.sent_at.isoformat()} is outside 1970-01-01 … "
                    "now + 1 day")
    return check_msg(msg)


def _valid_text(text: str) -> bool:
    """Valid Unicode (no lone surrogate): free for ASCII, one encode otherwise."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_ROLES = {alias: SenderRole(role) for alias, role in ROLE_ALIASES.items()}
_TASKS = {t.value: t for t in TaskType}
_PLAIN_ABSENT = ("user_id", "timestamp", "is_robot", "direction", "in_reply_to",
                 "in_response_to", "conversation_id", "thread")
_PLAIN_ABSENT_KEYS = frozenset(_PLAIN_ABSENT)


def _plain_id(value: Any, max_length: int, *, required: bool) -> str | None | bool:
    """A stripped id as ChatRow makes it, None for blank, or False: not plain."""
    if value is None:
        return False if required else None
    if type(value) is not str:
        return False
    text = value.strip()
    if len(text) > max_length or (required and not text):
        return False
    return text or None


def plain_msg(line: int, fields: dict[str, Any], tz: Any, *,
              latest: datetime | None = None) -> Msg | None:
    """The `Msg` that `ChatRow` validation gives for the common, plain row (text ids,
    a known sender_role, an ISO time within 1970-01-01 … `latest`, valid Unicode, no
    aliases), built without pydantic: the import validates every row, and this is
    several times cheaper. None means "not plain": the caller validates the row with
    `ChatRow` (which also words every error)."""
    get = fields.get
    if not _PLAIN_ABSENT_KEYS.isdisjoint(fields):
        for name in _PLAIN_ABSENT:
            if get(name) is not None:
                return None
    # The ids as `_plain_id` makes them, inline: this runs for every row of an import.
    message_id = get("message_id")
    account_id = get("account_id")
    shop_id = get("shop_id")
    if type(message_id) is not str or type(account_id) is not str or type(shop_id) is not str:
        return None
    message_id, account_id, shop_id = message_id.strip(), account_id.strip(), shop_id.strip()
    if (not message_id or len(message_id) > 128 or not account_id or len(account_id) > 64
            or not shop_id or len(shop_id) > 64):
        return None
    sender_id = _plain_id(get("sender_id"), 64, required=False)
    session_id = _plain_id(get("session_id"), 40, required=False)
    if sender_id is False or session_id is False:
        return None
    reply_to = thread_id = None
    if "reply_to" in fields or "thread_id" in fields:
        reply_to = _plain_id(get("reply_to"), 128, required=False)
        thread_id = _plain_id(get("thread_id"), MAX_THREAD_ID, required=False)
        if reply_to is False or thread_id is False:
            return None
    role = get("sender_role")
    content = get("content")
    sent_at = get("sent_at")
    if type(role) is not str or type(content) is not str or type(sent_at) is not str:
        return None
    sender_role = _ROLES.get(role.strip().lower())
    if sender_role is None or len(content) > 65535:
        return None
    message_type = get("message_type")
    if message_type is None or message_type == "":
        message_type = "text"
    elif type(message_type) is not str or len(message_type) > 32:
        return None
    task = get("task_type")
    task_type: TaskType | None = None
    if task is not None:
        if type(task) is not str:
            return None
        task = task.strip().lower()
        if task:
            task_type = _TASKS.get(task)
            if task_type is None:
                return None
    try:  # an ISO time as it is, as `parse_time` reads it (and it reads all the rest)
        moment = datetime.fromisoformat(sent_at)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=tz)
        if moment.tzinfo is not UTC:
            moment = moment.astimezone(UTC)
    except ValueError:
        try:
            moment = parse_time(sent_at, tz)
        except ValueError:
            return None
    except (OverflowError, OSError):
        return None
    if moment < EARLIEST_TIME or moment > (latest or utcnow() + LATEST_AHEAD):
        return None
    if not (content.isascii() and message_id.isascii()  # type: ignore[union-attr]
            and account_id.isascii() and shop_id.isascii()  # type: ignore[union-attr]
            and message_type.isascii() and (sender_id is None or sender_id.isascii())  # type: ignore[union-attr]
            and (session_id is None or session_id.isascii())  # type: ignore[union-attr]
            and (reply_to is None or reply_to.isascii())  # type: ignore[union-attr]
            and (thread_id is None or thread_id.isascii())):  # type: ignore[union-attr]
        texts = (content, message_id, account_id, shop_id, message_type, sender_id,
                 session_id, reply_to, thread_id)
        if not all(_valid_text(t) for t in texts if isinstance(t, str)):
            return None
    return Msg(line=line, message_id=message_id, account_id=account_id,  # type: ignore[arg-type]
               shop_id=shop_id, sender_role=sender_role, sender_id=sender_id,  # type: ignore[arg-type]
               content=content, message_type=message_type, sent_at=moment,
               session_id=session_id, task_type=task_type,  # type: ignore[arg-type]
               reply_to=reply_to, thread_id=thread_id)  # type: ignore[arg-type]


def check_msg(msg: Msg) -> Msg | str:
    if len(msg.content) * 4 > MAX_CONTENT_BYTES and (
        len(msg.content.encode("utf-8", "surrogatepass")) > MAX_CONTENT_BYTES
    ):
        return f"content: longer than {MAX_CONTENT_BYTES} bytes in UTF-8"
    if not msg.account_id or not msg.shop_id:
        return "account_id and shop_id are required (or a session_id naming a known session)"
    return msg


# ---- segmentation: `app.imports.segmenting` (a pipeline of replaceable steps) ---------


# ---- planning (pure) -------------------------------------------------------------------
@dataclass(slots=True)
class Known:
    """The facts about an existing session that grouping needs."""

    pk: int
    session_id: str
    session_type: SessionType
    status: SessionStatus
    start: datetime
    end: datetime | None  # None while the session is open (it runs until now)
    holds_slot: bool
    thread_id: str | None = None

    @classmethod
    def of(cls, session: Session) -> Known:
        status = S(session.status)
        start = session.first_message_at or session.activated_at or session.created_at
        end: datetime | None = None
        if status.is_terminal:
            candidates = [t for t in (session.ended_at, session.last_message_at) if t]
            end = max(candidates) if candidates else start
        return cls(pk=session.id, session_id=session.session_id,
                   session_type=SessionType(session.session_type), status=status,
                   start=start, end=end, holds_slot=bool(session.holds_slot),
                   thread_id=session.thread_id)

    @property
    def is_open(self) -> bool:
        return self.end is None


@dataclass
class NewSession:
    messages: list[Msg]
    session_type: SessionType
    task_type: TaskType
    owner_id: str | None
    unanswered: bool
    handoff_at: int | None  # index of the first staff message after the robot's
    closed: bool
    started_by: StartedBy | None = None
    thread_id: str | None = None

    @property
    def start(self) -> datetime:
        return self.messages[0].sent_at

    @property
    def end(self) -> datetime:
        return self.messages[-1].sent_at


@dataclass
class Attach:
    target: Known
    messages: list[Msg]


@dataclass
class FreeChat:
    """Staff wrote on a slot whose robot session is ACTIVE (seed "人工自由", case 1)."""

    robot: Known
    before: list[Msg]  # the segment's messages before the first staff message
    human: NewSession


Step = NewSession | Attach | FreeChat


def plan_slot(
    messages: Sequence[Msg],
    sessions: Sequence[Known],
    *,
    now: datetime,
    gap: timedelta | None = None,
    options: GroupingOptions | None = None,
    segmenter: Segmenter = split_at_gaps,
    stored: StoredLinks = NO_LINKS,
    verdicts: Mapping[str, bool] | None = None,
) -> list[Step]:
    """Decide what happens to a slot's new messages (time-ordered, de-duplicated):
    segment them (`segmenting.segment_slot`: threads, replies, the gap rule, review
    verdicts), then find each segment its session — the one it continues by a session_id,
    a thread or a reply; else, for a gap-rule segment, one it overlaps or continues
    within the gap; for a threaded one, an open session it overlaps (the thread wins over
    the overlap rule with ended ones) — or plan a new one."""
    if options is None:
        assert gap is not None
        options = GroupingOptions(session_gap=int(gap.total_seconds()))
    gap = options.gap
    steps: list[Step] = []
    by_id = {k.session_id: k for k in sessions}
    loose: list[Msg] = []
    pinned: dict[str, list[Msg]] = defaultdict(list)
    for msg in messages:
        if msg.session_id and msg.session_id in by_id:
            pinned[msg.session_id].append(msg)
        else:
            loose.append(msg)
    placed = [Segment(msgs, None, target=by_id[session_id])
              for session_id, msgs in pinned.items()]
    for segment in segment_slot(loose, options, placed=placed, stored=stored,
                                verdicts=verdicts, split=segmenter):
        msgs = segment.messages
        if segment.started_by is None:
            steps.append(Attach(segment.target, msgs))
            continue
        target: Known | None = segment.target
        if target is None:
            candidates = sessions if not segment.linked else [
                k for k in sessions if k.is_open and k.thread_id in (None, segment.thread_id)]
            target = choose_target(msgs, candidates, now=now, gap=gap)
        closed = msgs[-1].sent_at < now - gap
        if target is None:
            steps.append(new_session(msgs, closed=closed, started_by=segment.started_by,
                                     thread_id=segment.thread_id))
            continue
        first_staff = next(
            (i for i, m in enumerate(msgs) if m.sender_role == SenderRole.HUMAN), None
        )
        if (target.status == S.ACTIVE and target.session_type.is_robot
                and first_staff is not None):
            human = new_session(msgs[first_staff:], closed=closed, force_human=True,
                                started_by=segment.started_by, thread_id=segment.thread_id)
            steps.append(FreeChat(target, msgs[:first_staff], human))
        else:
            steps.append(Attach(target, msgs))
    return steps


def choose_target(
    segment: Sequence[Msg], sessions: Sequence[Known], *, now: datetime, gap: timedelta
) -> Known | None:
    """The session a segment overlaps or continues within `gap`: the slot's occupant
    first, else the one that ends last."""
    start, end = segment[0].sent_at, segment[-1].sent_at
    candidates = [
        k for k in sessions
        if k.start - gap <= end and start <= (k.end or now) + gap
    ]
    if not candidates:
        return None
    for k in candidates:
        if k.holds_slot:
            return k
    return max(candidates, key=lambda k: k.end or now)


def new_session(segment: list[Msg], *, closed: bool, force_human: bool = False,
                started_by: StartedBy | None = StartedBy.GAP,
                thread_id: str | None = None) -> NewSession:
    """Type a new session by our side's first sender (SPEC §4 step 5)."""
    task = next((m.task_type for m in segment if m.task_type), None)
    ours = [(i, m) for i, m in enumerate(segment) if m.sender_role in OUR_SIDE]
    handoff: int | None = None
    if not ours or force_human or ours[0][1].sender_role == SenderRole.HUMAN:
        kind = rules.DEFAULT_HUMAN_TYPE_BY_TASK.get(task, SessionType.MANUAL_CUSTOMER_SERVICE) \
            if task else SessionType.MANUAL_CUSTOMER_SERVICE
    else:
        kind = rules.DEFAULT_ROBOT_TYPE_BY_TASK[task] if task else SessionType.AUTO_BARGAIN
        handoff = next((i for i, m in ours if m.sender_role == SenderRole.HUMAN), None)
    owner = ours[0][1].sender_id if ours else None
    return NewSession(
        messages=segment, session_type=kind, task_type=task or rules.DEFAULT_TASK_BY_TYPE[kind],
        owner_id=owner, unanswered=not ours, handoff_at=handoff, closed=closed,
        started_by=started_by, thread_id=thread_id,
    )


def needs_slot_lock(steps: Iterable[Step]) -> bool:
    """Anything live goes through the slot rules; only the past is written in bulk."""
    for step in steps:
        if isinstance(step, FreeChat):
            return True
        if isinstance(step, Attach) and step.target.is_open:
            return True
        if isinstance(step, NewSession) and not step.closed:
            return True
    return False


# ---- reading what is stored -------------------------------------------------------------
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


# ---- writing ------------------------------------------------------------------------
# A multi-row INSERT written out here (`_mysql_insert`) holds at most this many
# characters — at most 4 bytes each in UTF-8: about PyMySQL's own 1 MB statements, far
# inside max_allowed_packet — and at most `batch` rows.
STATEMENT_CHARS = 256 * 1024
# PyMySQL's string escapes (`pymysql.converters.escape_string`), as a translate table:
# a list indexed by code point (a dict is several times slower to translate by).
_MYSQL_ESCAPES = [chr(code) for code in range(128)]
for _char, _escaped in {"\0": "\\0", "\\": "\\\\", "\n": "\\n", "\r": "\\r",
                        "\032": "\\Z", '"': '\\"', "'": "\\'"}.items():
    _MYSQL_ESCAPES[ord(_char)] = _escaped


def core_insert(db: DbSession, model: Any, rows: list[dict[str, Any]], *,
                batch: int | None = None) -> None:
    """Same-keyed rows inserted on the transaction's connection, in database batches
    of at most `batch` rows (the import passes BATCH_SIZE, the seed's 批处理大小: one
    database batch — on MySQL one multi-row INSERT — holds at most that many rows), or
    all of them in one batch without `batch`.

    The ORM's bulk path (`db.execute(insert(Model), rows)`) and even Core's spend
    more time arranging each row's parameters than the driver spends sending them.
    Here every column's bind processor (UTC times, JSON, …) is applied in one tight
    loop; on MySQL times go as the text of their literal (`mysql_utc_text`), and with
    PyMySQL the multi-row INSERT is written out here (`_mysql_insert`) — what PyMySQL's
    executemany sends, without its generic escaping of each value — elsewhere the rows
    go to the driver's executemany as they are."""
    if not rows:
        return
    conn = db.connection()
    dialect = conn.dialect
    table = model.__table__
    keys = list(rows[0])
    compiled = table.insert().compile(dialect=dialect, column_keys=keys)
    names = list(compiled.positiontup or []) if compiled.positional else keys
    procs = [(i, proc) for i, name in enumerate(names)
             if (proc := _bind_processor(table.c[name].type, dialect)) is not None]
    pick = operator.itemgetter(*names)
    step = batch if batch and batch > 0 else len(rows)
    statement = str(compiled)
    if dialect.name == "mysql" and dialect.driver == "pymysql":
        quote = dialect.identifier_preparer
        prefix = (f"INSERT INTO {quote.format_table(table)} "
                  f"({', '.join(quote.quote(name) for name in names)}) VALUES ")
        _mysql_insert(conn, prefix, rows, pick, len(names), procs, step)
        return
    params: list[Any] = []
    for row in rows:
        values = list(pick(row)) if len(names) > 1 else [pick(row)]
        for i, proc in procs:
            values[i] = proc(values[i])
        params.append(tuple(values) if compiled.positional else dict(zip(names, values,
                                                                         strict=True)))
    for start in range(0, len(params), step):
        conn.exec_driver_sql(statement, params[start:start + step])


def _mysql_insert(conn: Any, prefix: str, rows: list[dict[str, Any]],
                  pick: Callable[[dict[str, Any]], Any], width: int,
                  procs: list[tuple[int, Callable[[Any], Any]]], step: int) -> None:
    """`prefix` (`INSERT INTO t (a, b) VALUES `) then `(…),(…)`: statements of at most
    `step` rows and STATEMENT_CHARS characters each, the values written as PyMySQL
    writes them (`_literals`). Sent without parameters (no `%` formatting), through
    SQLAlchemy, so its errors (a duplicate key) are the usual ones."""
    raw = conn.connection.dbapi_connection
    from pymysql.constants import SERVER_STATUS

    table: list[str] | None = _MYSQL_ESCAPES
    if raw.server_status & SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES:
        table = None  # every value from the connection's `escape`, which knows the mode
    picked = [pick(row) for row in rows] if width > 1 else [(pick(row),) for row in rows]
    columns: list[Any] = list(zip(*picked, strict=True))
    for i, proc in procs:
        columns[i] = list(map(proc, columns[i]))
    texts = ["(" + ",".join(values) + ")" for values in zip(
        *(_literals(column, raw.escape, table) for column in columns), strict=True)]
    options = {"no_parameters": True}
    first = chars = 0
    for index, text in enumerate(texts):
        if index > first and (index - first >= step or chars + len(text) > STATEMENT_CHARS):
            conn.exec_driver_sql(prefix + ",".join(texts[first:index]),
                                 execution_options=options)
            first, chars = index, 0
        chars += len(text) + 1
    conn.exec_driver_sql(prefix + ",".join(texts[first:]), execution_options=options)


def _literals(values: Sequence[Any], escape: Callable[[Any], str],
              table: list[str] | None) -> list[str]:
    """One column's values as SQL literals, as PyMySQL writes them: a str escaped by
    PyMySQL's table, in quotes; an int in digits; None as NULL; anything else (bytes,
    bools, floats, …) by the connection's `escape` (and everything by it when `table` is
    None). A column that repeats its values (a slot, a role, the job) has each distinct
    value written once: equal values have the same literal."""
    if table is None:
        return [escape(v) for v in values]
    try:  # judged by its first values: hashing a column of long texts costs
        repeats = len(values) >= 8 and len(set(values[:64])) * 4 <= min(64, len(values))
    except TypeError:  # an unhashable value: written one by one
        repeats = False
    if repeats:
        distinct = list(set(values))
        known = dict(zip(distinct, _literals(distinct, escape, table), strict=True))
        return list(map(known.__getitem__, values))
    return ["'" + v.translate(table) + "'" if v.__class__ is str
            else "NULL" if v is None
            else str(v) if v.__class__ is int
            else escape(v)
            for v in values]


def _bind_processor(type_: Any, dialect: Any) -> Callable[[Any], Any] | None:
    """The column type's own bind processor, except for UTC times on MySQL."""
    if dialect.name == "mysql" and isinstance(type_, UTCDateTime):
        return mysql_utc_text
    return type_._cached_bind_processor(dialect)  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=8192)
def mysql_utc_text(value: datetime | None) -> str | None:
    """A time as the DATETIME(6) literal that PyMySQL would send for it, made by
    `isoformat` (C): PyMySQL's own formatting plus the UTC conversion cost several
    times more, and a chunk binds about four times per message. Remembered, because
    most binds repeat a time (a session's first and last message, the chunk's now)."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r} given where UTC is required")
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


def message_values(msg: Msg, session_pk: int, now: datetime, job_id: str | None
                   ) -> dict[str, Any]:
    return {
        "message_id": msg.message_id, "session_pk": session_pk, "account_id": msg.account_id,
        "shop_id": msg.shop_id, "sender_role": str(msg.sender_role), "sender_id": msg.sender_id,
        "content": msg.content, "message_type": msg.message_type, "sent_at": msg.sent_at,
        "received_at": now, "import_job_id": job_id,
    }


def count_roles(messages: Sequence[Msg]) -> dict[SenderRole, int]:
    counts = dict.fromkeys(SenderRole, 0)
    for m in messages:
        counts[m.sender_role] += 1
    return counts


def add_to_session(session: Session, messages: Sequence[Msg]) -> None:
    """Counters and message times of `session` after `messages` were stored on it."""
    roles = count_roles(messages)
    session.message_count = (session.message_count or 0) + len(messages)
    session.robot_message_count = (session.robot_message_count or 0) + roles[SenderRole.ROBOT]
    session.human_message_count = (session.human_message_count or 0) + roles[SenderRole.HUMAN]
    session.counterpart_message_count = (
        (session.counterpart_message_count or 0) + roles[SenderRole.COUNTERPART]
    )
    first = min(m.sent_at for m in messages)
    last = max(m.sent_at for m in messages)
    if session.first_message_at is None or first < session.first_message_at:
        session.first_message_at = first
    if session.last_message_at is None or last > session.last_message_at:
        session.last_message_at = last
    if session.origin == Origin.IMPORT and S(session.status).is_terminal and (
        session.ended_at is None or last > session.ended_at
    ):
        session.ended_at = last


class Writer:
    """Collects one transaction's rows and writes them with a few bulk statements."""

    def __init__(self, db: DbSession, *, now: datetime, actor: str, job_id: str | None,
                 batch: int | None = None) -> None:
        self.db = db
        self.now = now
        self.actor = actor
        self.job_id = job_id
        self.batch = batch  # rows per INSERT (BATCH_SIZE), None: no bound
        self.counts = ImportCounts()
        self._sessions: list[tuple[dict[str, Any], NewSession]] = []
        self._messages: list[tuple[Msg, int | str]] = []  # session pk, or public id if new
        self._attached: dict[int, list[Msg]] = defaultdict(list)

    # closed (historical) sessions: no slot, no events
    def closed_session(self, plan: NewSession) -> None:
        msgs = plan.messages
        roles = count_roles(msgs)
        public = new_id("ses")
        first = msgs[0]
        values = {
            "session_id": public, "account_id": first.account_id, "shop_id": first.shop_id,
            "session_type": str(plan.session_type), "task_type": str(plan.task_type),
            "priority": int(rules.default_priority(plan.session_type, plan.task_type)),
            "status": str(S.COMPLETED), "holds_slot": None, "pause_cause": None,
            "owner_id": plan.owner_id,
            "assigned_agent_id": plan.owner_id if plan.session_type.is_human else None,
            "origin": str(Origin.IMPORT), "created_at": plan.start, "requested_at": plan.start,
            "activated_at": plan.start, "ended_at": plan.end, "last_activity_at": plan.end,
            "deadline_at": None, "message_count": len(msgs),
            "robot_message_count": roles[SenderRole.ROBOT],
            "human_message_count": roles[SenderRole.HUMAN],
            "counterpart_message_count": roles[SenderRole.COUNTERPART],
            "first_message_at": plan.start, "last_message_at": plan.end,
            "end_reason": "history import", "unanswered": plan.unanswered,
            "reason": "history import",
            "started_by": str(plan.started_by) if plan.started_by else None,
            "thread_id": plan.thread_id,
        }
        self._sessions.append((values, plan))
        self._messages.extend((m, public) for m in msgs)
        self.counts.sessions_created += 1

    def attach_closed(self, target: Known, messages: list[Msg]) -> None:
        self._attached[target.pk].extend(messages)

    def flush(self) -> None:
        db = self.db
        public_to_pk: dict[str, int] = {}
        if self._sessions:
            # Each session's one audit row is made first, so that its hash, the chain
            # head, is inserted with the session; primary keys are filled in after.
            audits, transfers = [], []
            for values, plan in self._sessions:
                pk = 0
                details: dict[str, Any] = {
                    "job_id": self.job_id, "messages": len(plan.messages),
                    "first_message_at": plan.start.isoformat(),
                    "last_message_at": plan.end.isoformat(),
                }
                if plan.unanswered:
                    details["unanswered"] = True
                if plan.handoff_at is not None:
                    transfer = handoff_transfer(values, pk, plan.messages, plan.handoff_at,
                                                ended_at=plan.end, closed=True)
                    transfers.append(transfer)
                    details["transfer_id"] = transfer["transfer_id"]
                audits.append(operation_values(
                    session_pk=pk, session_id=values["session_id"], operation="import",
                    from_status=None, to_status=S.COMPLETED, actor=self.actor, at=self.now,
                    prev_hash=None, reason="history import", details=details,
                ))
                values["audit_head"] = audits[-1]["row_hash"]
            core_insert(db, Session, [values for values, _ in self._sessions], batch=self.batch)
            ids = [values["session_id"] for values, _ in self._sessions]
            for i in range(0, len(ids), ID_BATCH):
                public_to_pk.update(dict(db.execute(
                    select(Session.session_id, Session.id)
                    .where(Session.session_id.in_(ids[i:i + ID_BATCH]))
                ).all()))
            for row in (*audits, *transfers):
                row["session_pk"] = public_to_pk[row["session_id"]]
            core_insert(db, Operation, audits, batch=self.batch)
            if transfers:
                core_insert(db, Transfer, transfers, batch=self.batch)
        if self._attached:
            pks = sorted(self._attached)
            rows = {s.id: s for s in db.execute(
                select(Session).where(Session.id.in_(pks)).with_for_update()
            ).scalars()}
            prev_hashes = last_hashes(db, pks)
            handed_over = self._sessions_with_transfers(pks)
            audits, transfers = [], []
            for pk in pks:
                session, msgs = rows[pk], self._attached[pk]
                self._messages.extend((m, pk) for m in msgs)
                add_to_session(session, msgs)
                details = {"job_id": self.job_id, "messages": len(msgs)}
                # Staff found on an ended robot session that never went to a person: the
                # same hand-off as inside a new segment (§4 step 5), recorded once.
                staff_at = next((i for i, m in enumerate(msgs)
                                 if m.sender_role == SenderRole.HUMAN), None)
                if (staff_at is not None and pk not in handed_over
                        and SessionType(session.session_type).is_robot):
                    transfer = handoff_transfer(session, pk, msgs, staff_at,
                                                ended_at=session.ended_at, closed=True)
                    transfers.append(transfer)
                    details["transfer_id"] = transfer["transfer_id"]
                audits.append(operation_values(
                    session_pk=pk, session_id=session.session_id, operation="import-messages",
                    from_status=session.status, to_status=session.status, actor=self.actor,
                    at=self.now, prev_hash=prev_hashes.get(pk), reason="history import",
                    details=details,
                ))
                session.audit_head = audits[-1]["row_hash"]  # rides on the session's UPDATE
                self.counts.sessions_updated += 1
            core_insert(db, Operation, audits, batch=self.batch)
            if transfers:
                core_insert(db, Transfer, transfers, batch=self.batch)
        if self._messages:
            message_rows = [
                message_values(m, public_to_pk[ref] if isinstance(ref, str) else ref,
                               self.now, self.job_id)
                for m, ref in self._messages
            ]
            core_insert(db, Message, message_rows, batch=self.batch)
            self.counts.inserted += len(message_rows)
        db.flush()


    def _sessions_with_transfers(self, pks: Sequence[int]) -> set[int]:
        found: set[int] = set()
        for i in range(0, len(pks), ID_BATCH):
            found.update(self.db.execute(
                select(Transfer.session_pk).where(Transfer.session_pk.in_(pks[i:i + ID_BATCH]))
            ).scalars())
        return found


def handoff_transfer(session: dict[str, Any] | Session, session_pk: int,
                     messages: Sequence[Msg], handoff_at: int, *, ended_at: datetime | None,
                     closed: bool) -> dict[str, Any]:
    """The transfer record of a robot→staff hand-off found in history (trigger `history`):
    `messages[handoff_at]` is the first staff message after the robot's. Its `history`
    is a reference (SPEC §3.6: the conversation history, or a reference to it): the
    session and the ids of the up to 10 messages before the hand-off, which are stored
    with that session in the same transaction; a copy of their texts made every
    hand-off of an import cost about a tenth of its work."""
    staff = messages[handoff_at]
    public = session["session_id"] if isinstance(session, dict) else session.session_id
    recent = messages[max(0, handoff_at - 10):handoff_at]
    return {
        "transfer_id": new_id("trf"), "session_pk": session_pk, "session_id": public,
        "status": str(TransferStatus.COMPLETED if closed else TransferStatus.ACCEPTED),
        "urgency": int(Priority.HIGH), "reason": "hand-off found in imported history",
        "trigger": str(TransferTrigger.HISTORY), "requested_agent_id": None,
        "offered_agent_id": staff.sender_id, "agent_id": staff.sender_id,
        "history": {"session_id": public,
                    "recent_message_ids": [m.message_id for m in recent]},
        "task_state": None, "customer_info": None, "suggestion": None, "escalations": 0,
        "previous_transfer_id": None, "created_at": staff.sent_at, "offered_at": staff.sent_at,
        "expires_at": None, "accepted_at": staff.sent_at,
        "ended_at": ended_at if closed else None,
    }


# ---- the live path: one slot under its lock --------------------------------------------
def apply_live_slot(tx: Any, steps: list[Step], *, job_id: str | None,
                    counts: ImportCounts, batch: int | None = None) -> None:
    """Apply a slot's plan inside `SessionService.run_on_slot` (a SlotTx)."""
    writer = Writer(tx.db, now=tx.now, actor=tx.actor, job_id=job_id, batch=batch)
    for step in steps:
        if isinstance(step, NewSession):
            if step.closed:
                writer.closed_session(step)
            else:
                _live_session(tx, writer, step, counts)
        elif isinstance(step, Attach):
            if step.target.is_open:
                _attach_open(tx, writer, step.target.pk, step.messages, counts)
            else:
                writer.attach_closed(step.target, step.messages)
        else:
            if step.before:
                _attach_open(tx, writer, step.robot.pk, step.before, counts)
            _free_chat(tx, writer, step, counts)
    writer.flush()
    counts.add(writer.counts)


def _store_on(tx: Any, writer: Writer, session: Session, msgs: list[Msg]) -> None:
    core_insert(tx.db, Message, [message_values(m, session.id, tx.now, writer.job_id)
                                 for m in msgs], batch=writer.batch)
    add_to_session(session, msgs)
    writer.counts.inserted += len(msgs)


def _attach_open(tx: Any, writer: Writer, pk: int, msgs: list[Msg],
                 counts: ImportCounts) -> None:
    session = tx.db.get(Session, pk)
    _store_on(tx, writer, session, msgs)
    last = max(m.sent_at for m in msgs)
    if last > session.last_activity_at:
        session.last_activity_at = last
        session.deadline_at = tx.service.deadline_for(session, tx.now)
    tx.audit(session, "import-messages", from_status=session.status, reason="history import",
             details={"job_id": writer.job_id, "messages": len(msgs)})
    counts.sessions_updated += 1
    if (session.status == S.ACTIVE and SessionType(session.session_type).is_robot
            and any(m.sender_role == SenderRole.COUNTERPART for m in msgs)
            and session.session_id not in tx.counterpart_sessions):
        tx.counterpart_sessions.append(session.session_id)


def _new_live_row(tx: Any, plan: NewSession, job_id: str | None) -> Session:
    session = Session(
        session_id=new_id("ses"), account_id=tx.account_id, shop_id=tx.shop_id,
        session_type=plan.session_type, task_type=plan.task_type,
        priority=int(rules.default_priority(plan.session_type, plan.task_type)),
        status=S.PENDING, owner_id=plan.owner_id,
        assigned_agent_id=plan.owner_id if plan.session_type.is_human else None,
        origin=Origin.IMPORT, created_at=plan.start, requested_at=tx.now,
        last_activity_at=plan.end, reason="history import", message_count=0,
        robot_message_count=0, human_message_count=0, counterpart_message_count=0,
        unanswered=plan.unanswered,
        started_by=str(plan.started_by) if plan.started_by else None, thread_id=plan.thread_id,
    )
    session.deadline_at = tx.service.deadline_for(session, tx.now)
    tx.db.add(session)
    tx.db.flush()
    tx.audit(session, "create", from_status=None, reason="history import",
             details={"job_id": job_id, "origin": "import",
                      "first_message_at": plan.start.isoformat()})
    return session


def _live_session(tx: Any, writer: Writer, plan: NewSession, counts: ImportCounts) -> None:
    """A segment still going on joins the slot rules like any request (§3.5)."""
    session = _new_live_row(tx, plan, writer.job_id)
    occupant = tx.occupant()
    tx.claim_or_wait(session)
    if occupant is not None:
        counts.conflicts += 1
    _store_on(tx, writer, session, plan.messages)
    if session.status == S.ACTIVE:
        session.last_activity_at = max(plan.end, session.activated_at or plan.end)
    session.deadline_at = tx.service.deadline_for(session, tx.now)
    if session.status == S.PENDING:
        tx.event("session.queued", session, {"origin": "import",
                                              "occupant_session_id": occupant.session_id
                                              if occupant else None})
    if plan.handoff_at is not None and session.status == S.ACTIVE:
        tx.service.open_transfer(tx, session, TransferRequest(
            reason="hand-off found in imported history", urgency=Priority.HIGH,
            trigger=TransferTrigger.HISTORY,
            agent_id=plan.messages[plan.handoff_at].sender_id,
        ))
    counts.sessions_created += 1
    if (session.status == S.ACTIVE and SessionType(session.session_type).is_robot
            and any(m.sender_role == SenderRole.COUNTERPART for m in plan.messages)):
        tx.counterpart_sessions.append(session.session_id)


def _free_chat(tx: Any, writer: Writer, step: FreeChat, counts: ImportCounts) -> None:
    """Case 1 for staff found talking during an ACTIVE robot session: the robot is
    paused (and told, through the outbox), a human session is recorded; if the staff
    conversation is already over, that human session completes and the robot resumes."""
    plan = step.human
    human = _new_live_row(tx, plan, writer.job_id)
    tx.claim_or_wait(human)  # human outranks robot: the robot is preempted (PAUSED)
    counts.conflicts += 1
    _store_on(tx, writer, human, plan.messages)
    human.last_activity_at = plan.end
    human.deadline_at = tx.service.deadline_for(human, tx.now)
    robot = tx.db.get(Session, step.robot.pk)
    tx.audit(robot, "import-conflict", from_status=robot.status,
             reason="staff messages found in history while the robot session was active",
             details={"human_session_id": human.session_id, "job_id": writer.job_id})
    counts.sessions_created += 1
    counts.sessions_updated += 1
    if plan.closed and S(human.status).occupies_slot:
        tx.leave_slot(human, S.COMPLETED, operation="complete", event="session.completed",
                      reason="history import: staff conversation already over")


# ---- the entry point for a batch -------------------------------------------------------
@dataclass
class BatchContext:
    """Where a batch comes from; the job pipeline passes its chunk's markers."""

    job_id: str | None = None
    chunk_pk: int | None = None
    segmenter: Segmenter = split_at_gaps  # the gap rule's step
    # The upload's grouping options (None: SESSION_GAP, grouping=auto, no review)
    options: GroupingOptions | None = None
    # Set when the upload asked for review (and an endpoint is configured)
    reviewer: BoundaryReviewer | None = None
    # Rows per INSERT (BATCH_SIZE: one database batch); None: no bound.
    batch_rows: int | None = None
    # Runs inside the bulk transaction before its commit (the chunk's 'done' marker).
    before_commit: Callable[[DbSession, ImportCounts], None] | None = None
    # Test hook: called after the bulk rows are written, before the commit.
    after_write: Callable[[], None] | None = None
    live_marks: Callable[[DbSession], dict[Slot, ImportCounts]] | None = None
    mark_slot: Callable[[DbSession, Slot, ImportCounts], None] | None = None


def import_rows(
    runtime: Any,
    rows: Sequence[tuple[int, ChatRow]],
    *,
    actor: str = ACTOR,
) -> ImportCounts:
    """Group validated rows into sessions and store them (the Python API's door)."""
    counts = ImportCounts()
    msgs: list[Msg] = []
    resolved = resolve_session_slots(runtime, [row.session_id for _, row in rows
                                               if row.session_id and not row.account_id])
    for line, row in rows:
        msg = Msg.from_row(line, row)
        if msg.session_id and (not msg.account_id or not msg.shop_id):
            slot = resolved.get(msg.session_id)
            if slot:
                msg.account_id, msg.shop_id = slot
        checked = check_msg(msg)
        if isinstance(checked, str):
            counts.error(line, checked)
        else:
            msgs.append(checked)
    counts.add(import_messages(runtime, msgs, actor=actor, context=BatchContext(
        batch_rows=runtime.settings.batch_size)))
    return counts


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


def review_boundaries(runtime: Any, slots: dict[Slot, list[Msg]], options: GroupingOptions,
                      reviewer: BoundaryReviewer, *, segmenter: Segmenter = split_at_gaps
                      ) -> ReviewOutcome:
    """SPEC §4d, before the chunk's transaction: segment the slots' new rows as the
    transaction will (read-only: stored rows dropped, stored links looked up), and ask
    the reviewer about the ambiguous gap-rule boundaries. A row that a concurrent writer
    stores meanwhile only makes a verdict unused."""
    with runtime.database.read() as db:
        fresh = fresh_messages(db, slots, ImportCounts())
        links = stored_links(db, fresh, options)
        named = sorted({m.session_id for msgs in fresh.values() for m in msgs
                        if m.session_id})
        pinned_to: dict[str, Slot] = {}
        for i in range(0, len(named), ID_BATCH):
            for sid, account, shop in db.execute(
                    select(Session.session_id, Session.account_id, Session.shop_id)
                    .where(Session.session_id.in_(named[i:i + ID_BATCH]))):
                pinned_to[sid] = (account, shop)
    boundaries: list[Boundary] = []
    for slot, msgs in fresh.items():
        pinned: dict[str, list[Msg]] = defaultdict(list)
        loose: list[Msg] = []
        for msg in msgs:
            if msg.session_id and pinned_to.get(msg.session_id) == slot:
                pinned[msg.session_id].append(msg)
            else:
                loose.append(msg)
        segments = segment_slot(loose, options, placed=[Segment(m, None) for m in
                                                        pinned.values()],
                                stored=links.get(slot, NO_LINKS), split=segmenter)
        boundaries.extend(review_candidates(segments, min_gap=reviewer.min_gap,
                                            max_gap=reviewer.max_gap,
                                            context=REVIEW_CONTEXT))
    return reviewer.review(boundaries)


class SlotsBecameLive(Exception):
    """Raised inside the bulk transaction: these slots need the slot lock instead."""

    def __init__(self, slots: list[Slot]) -> None:
        super().__init__(f"{len(slots)} slots need the slot lock")
        self.slots = slots


def import_messages(
    runtime: Any, msgs: Sequence[Msg], *, actor: str, context: BatchContext
) -> ImportCounts:
    """Steps 2–7 for validated messages of any number of slots (all of each slot's rows).

    Everything that only touches the past is written in one bulk transaction; a slot
    with anything live is taken out of it and applied in its own slot transaction
    (`run_on_slot`, with a mark when a chunk is given). The bulk transaction is
    retried on a duplicate key or a deadlock caused by a concurrent writer. With review
    on, the review's verdicts are asked for first, outside any transaction."""
    options = context.options or GroupingOptions(session_gap=runtime.settings.session_gap)
    by_slot: dict[Slot, list[Msg]] = defaultdict(list)
    for msg in msgs:
        by_slot[(msg.account_id, msg.shop_id)].append(msg)
    total = ImportCounts()
    if context.live_marks:
        with runtime.database.read() as db:
            marks = context.live_marks(db)
        for slot, counts in marks.items():
            if slot in by_slot:
                total.add(counts)
                del by_slot[slot]
    verdicts: dict[str, bool] = {}
    if context.reviewer is not None and by_slot:
        outcome = review_boundaries(runtime, by_slot, options, context.reviewer,
                                    segmenter=context.segmenter)
        verdicts = outcome.verdicts
        total.boundaries_reviewed += outcome.reviewed
        total.boundaries_merged += outcome.merged

    last_error: Exception | None = None
    attempt = 0
    while attempt < BULK_ATTEMPTS:
        try:
            with runtime.database.unit_of_work() as uow:
                # A first attempt probes for stored rows; a retry after a duplicate
                # key (or any other refusal) looks every message id up.
                counts = _bulk(uow, by_slot, actor, context, options, verdicts,
                               probe=attempt == 0)
                if context.after_write:
                    context.after_write()
                if context.before_commit:
                    context.before_commit(uow.session, _sum(total, counts))
                uow.commit()
            total.add(counts)
            return total
        except SlotsBecameLive as live:
            for slot in live.slots:
                total.add(_run_live_slot(runtime, slot, by_slot.pop(slot), actor, context,
                                         options, verdicts))
        except (IntegrityError, OperationalError) as exc:
            if isinstance(exc, OperationalError) and not is_retryable_db_error(exc):
                raise
            last_error = exc
            attempt += 1
            log.info("import batch retried after %s (attempt %d)", type(exc).__name__, attempt)
    assert last_error is not None
    raise last_error


def _sum(a: ImportCounts, b: ImportCounts) -> ImportCounts:
    c = ImportCounts()
    c.add(a)
    c.add(b)
    return c


def _bulk(uow: UnitOfWork, slots: dict[Slot, list[Msg]], actor: str,
          context: BatchContext, options: GroupingOptions, verdicts: Mapping[str, bool], *,
          probe: bool) -> ImportCounts:
    db = uow.session
    counts = ImportCounts()
    gap = options.gap
    fresh = fresh_messages(db, slots, counts, probe=probe)
    links = stored_links(db, fresh, options)
    known = known_sessions(db, fresh, window=TimeWindow.around(
        (m for msgs in fresh.values() for m in msgs), gap))
    now = utcnow()
    writer = Writer(db, now=now, actor=actor, job_id=context.job_id, batch=context.batch_rows)
    live: list[Slot] = []
    plans: list[list[Step]] = []
    for slot, msgs in fresh.items():
        steps = plan_slot(msgs, [Known.of(s) for s in known.get(slot, [])], now=now,
                          options=options, segmenter=context.segmenter,
                          stored=links.get(slot, NO_LINKS), verdicts=verdicts)
        if needs_slot_lock(steps):
            live.append(slot)
        plans.append(steps)
    if live:
        raise SlotsBecameLive(live)
    for steps in plans:
        for step in steps:
            if isinstance(step, NewSession):
                writer.closed_session(step)
            elif isinstance(step, Attach):
                writer.attach_closed(step.target, step.messages)
    merged = merged_since_read(db, [step.target.pk for steps in plans for step in steps
                                    if isinstance(step, Attach)])
    if merged:  # an operator merged a target away since the plan read it: redo those slots
        raise SlotsBecameLive(merged)  # under the slot lock, which corrections hold (§11)
    writer.flush()
    counts.add(writer.counts)
    return counts


def _run_live_slot(runtime: Any, slot: Slot, msgs: list[Msg], actor: str,
                   context: BatchContext, options: GroupingOptions,
                   verdicts: Mapping[str, bool]) -> ImportCounts:
    gap = options.gap

    def work(tx: Any) -> ImportCounts:
        counts = ImportCounts()
        if context.live_marks:
            marks = context.live_marks(tx.db)
            if slot in marks:
                return marks[slot]
        fresh = fresh_messages(tx.db, {slot: msgs}, counts)
        window = TimeWindow.around(fresh.get(slot, []), gap)
        sessions = [Known.of(s) for s in known_sessions(tx.db, [slot], window=window)
                    .get(slot, [])]
        links = stored_links(tx.db, fresh, options)
        steps = plan_slot(fresh.get(slot, []), sessions, now=tx.now, options=options,
                          segmenter=context.segmenter, stored=links.get(slot, NO_LINKS),
                          verdicts=verdicts)
        apply_live_slot(tx, steps, job_id=context.job_id, counts=counts,
                        batch=context.batch_rows)
        if context.mark_slot:
            context.mark_slot(tx.db, slot, counts)
        return counts

    return runtime.sessions.run_on_slot(slot[0], slot[1], actor, work)
