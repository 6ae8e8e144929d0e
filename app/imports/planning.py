"""Planning a slot's new messages (SPEC §4 steps 4–5), pure: segment them
(`app.imports.segmenting`), then attach each segment to the session it continues, plan
a new session, or — staff talking on a slot whose robot session is ACTIVE — the seed's
"人工自由" case 1 (`FreeChat`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from app.imports.rows import Msg
from app.imports.segmenting import (
    NO_LINKS,
    GroupingOptions,
    Segment,
    Segmenter,
    StartedBy,
    StoredLinks,
    segment_slot,
    split_at_gaps,
)
from app.sessions import rules
from app.sessions.enums import SenderRole, SessionStatus, SessionType, TaskType
from app.sessions.models import Session

S = SessionStatus
OUR_SIDE = (SenderRole.ROBOT, SenderRole.HUMAN)


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
        status = session.status
        start = session.first_message_at or session.activated_at or session.created_at
        end: datetime | None = None
        if status.is_terminal:
            candidates = [t for t in (session.ended_at, session.last_message_at) if t]
            end = max(candidates) if candidates else start
        return cls(pk=session.id, session_id=session.session_id,
                   session_type=session.session_type, status=status,
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

