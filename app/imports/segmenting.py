"""Segmenting one slot's new messages into conversations (SPEC §4 step 4, a–d). Pure.

A slot's rows (time-ordered, de-duplicated) go through a pipeline of replaceable steps;
each step places some of the rows no earlier step placed (`SlotWork.rest`) into
conversations (`Segment`) and leaves the others to the next:

    a. `join_threads`       rows sharing a `thread_id` are one conversation, however
                            long its silences (a thread stored by an earlier upload is
                            continued: `Segment.target`)
    b. `follow_replies`     a row whose `reply_to` names a row of the slot joins that
                            row's conversation — a thread, a chain of replies of this
                            upload (branches included), or a stored session (the
                            parent's, from an earlier upload); a `reply_to` naming
                            nothing known leaves the row to the next step
    c. `split_rest_at_gaps` everything else by the gap rule (a new segment where the gap
                            exceeds the job's `session_gap`)
    d. `apply_review`       gap-rule boundaries the LLM judged (`review.py` asks it, in
                            the worker, before the chunk's transaction): merged, or kept
                            as a boundary the review confirmed

The `grouping` option picks the pipeline (`PIPELINES`): `auto` is a–d, `gap` is c–d
alone (threading fields ignored), `threads` is a–b with every row left over a
conversation of its own. Without threading fields and without review verdicts, `auto`
is exactly the gap rule. Every segment records why it starts where it starts
(`started_by`), which a new session keeps.

This module knows nothing of the database: what is stored reaches it as `StoredLinks`
(looked up by the caller), the sessions there as opaque values (`planning.Known`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from app.imports.rows import Msg


class StartedBy(StrEnum):
    """Why an imported session starts where it starts."""

    THREAD = "thread"  # its rows share a thread_id (or, grouping=threads, no row links it)
    REPLY = "reply"  # a chain of replies
    GAP = "gap"  # the gap rule: a silence longer than session_gap before it
    REVIEW = "review"  # a gap-rule boundary the LLM review judged and kept


class Grouping(StrEnum):
    AUTO = "auto"  # threading fields where rows have them, the gap rule for the rest
    THREADS = "threads"  # threading fields alone
    GAP = "gap"  # the gap rule alone


@dataclass(frozen=True)
class GroupingOptions:
    """An upload's grouping options (SPEC §4), resolved against the settings."""

    session_gap: int  # seconds
    grouping: Grouping = Grouping.AUTO
    review: bool = False
    gap: timedelta = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "gap", timedelta(seconds=self.session_gap))  # read per slot


@dataclass(slots=True)
class Segment:
    """One conversation of new rows (time-ordered)."""

    messages: list[Msg]
    started_by: StartedBy | None  # None: rows pinned to a stored session by session_id
    thread_id: str | None = None
    target: Any = None  # the stored session it continues (by session_id, thread or reply)
    linked: bool = False  # made by threading fields: the overlap rule does not regroup it

    @property
    def start(self) -> Any:
        return self.messages[0].sent_at


@dataclass
class StoredLinks:
    """What the threading fields of a slot's rows point to in storage: the session of a
    stored message (`by_message`: message id → session key), of a stored thread
    (`by_thread`: thread id → session key), and those sessions by key."""

    by_message: dict[str, Hashable] = field(default_factory=dict)
    by_thread: dict[str, Hashable] = field(default_factory=dict)
    sessions: dict[Hashable, Any] = field(default_factory=dict)


NO_LINKS = StoredLinks()


class Segmenter(Protocol):
    """The gap rule's shape: time-ordered rows in, consecutive segments out."""

    def __call__(self, messages: Sequence[Msg], gap: timedelta) -> list[list[Msg]]: ...


def split_at_gaps(messages: Sequence[Msg], gap: timedelta) -> list[list[Msg]]:
    """The gap rule: a new segment wherever two consecutive messages are more than
    `gap` apart. `messages` are in time order."""
    segments: list[list[Msg]] = []
    for msg in messages:
        if segments and msg.sent_at - segments[-1][-1].sent_at <= gap:
            segments[-1].append(msg)
        else:
            segments.append([msg])
    return segments


@dataclass
class SlotWork:
    """One slot's segmenting in progress: the steps move rows from `rest` to `segments`."""

    rest: list[Msg]
    options: GroupingOptions
    stored: StoredLinks = field(default_factory=StoredLinks)
    # Review verdicts by the id of the first row after a gap-rule boundary: True merges
    # the two segments, False keeps the boundary (confirmed by the review).
    verdicts: Mapping[str, bool] = field(default_factory=dict)
    split: Segmenter = split_at_gaps
    segments: list[Segment] = field(default_factory=list)
    # The gap-rule segments, in order, with the silence before each (None: the first)
    gap_segments: list[tuple[Segment, timedelta | None]] = field(default_factory=list)


Step = Callable[[SlotWork], None]


def join_threads(work: SlotWork) -> None:
    """a. Rows sharing a thread_id form one conversation."""
    threads: dict[str, list[Msg]] = {}
    rest: list[Msg] = []
    for msg in work.rest:
        if msg.thread_id:
            threads.setdefault(msg.thread_id, []).append(msg)
        else:
            rest.append(msg)
    for thread_id, msgs in threads.items():
        key = work.stored.by_thread.get(thread_id)
        work.segments.append(Segment(
            msgs, StartedBy.THREAD, thread_id=thread_id, linked=True,
            target=work.stored.sessions.get(key) if key is not None else None))
    work.rest = rest


def follow_replies(work: SlotWork) -> None:
    """b. A row answering a row of the slot joins that row's conversation: each chain of
    replies is followed up to its root — a row already placed (a thread, a pinned row),
    a stored message, or a row of this upload that answers nothing known."""
    if not any(msg.reply_to for msg in work.rest):
        return
    placed = {m.message_id: i for i, seg in enumerate(work.segments) for m in seg.messages}
    waiting = {m.message_id: m for m in work.rest}
    root_of: dict[str, tuple[str, Hashable]] = {}

    def root(msg: Msg) -> tuple[str, Hashable]:
        path: list[str] = []
        current = msg
        while True:
            known = root_of.get(current.message_id)
            if known is not None:
                found = known
                break
            path.append(current.message_id)
            parent = current.reply_to
            if not parent or parent == current.message_id:
                found = ("row", current.message_id)
                break
            if parent in placed:
                found = ("segment", placed[parent])
                break
            following = waiting.get(parent)
            if following is None:
                key = work.stored.by_message.get(parent)
                found = ("stored", key) if key is not None else ("row", current.message_id)
                break
            if following.message_id in path:  # a cycle: where it closes is its root
                found = ("row", following.message_id)
                break
            current = following
        for message_id in path:
            root_of[message_id] = found
        return found

    groups: dict[tuple[str, Hashable], list[Msg]] = {}
    for msg in work.rest:
        groups.setdefault(root(msg), []).append(msg)
    rest: list[Msg] = []
    grown: set[int] = set()
    for (kind, key), msgs in groups.items():
        if kind == "segment":
            assert isinstance(key, int)
            work.segments[key].messages.extend(msgs)
            grown.add(key)
        elif kind == "stored":
            work.segments.append(Segment(msgs, StartedBy.REPLY, linked=True,
                                         target=work.stored.sessions.get(key)))
        elif len(msgs) > 1:
            work.segments.append(Segment(msgs, StartedBy.REPLY, linked=True))
        else:
            rest.extend(msgs)  # linked to nothing known: the gap rule decides
    for index in grown:
        work.segments[index].messages.sort(key=_time_order)
    rest.sort(key=_time_order)
    work.rest = rest


def split_rest_at_gaps(work: SlotWork) -> None:
    """c. Every row left, by the gap rule (the job's `session_gap`)."""
    previous: Msg | None = None
    for msgs in work.split(work.rest, work.options.gap):
        segment = Segment(msgs, StartedBy.GAP)
        work.segments.append(segment)
        work.gap_segments.append(
            (segment, msgs[0].sent_at - previous.sent_at if previous else None))
        previous = msgs[-1]
    work.rest = []


def each_row_alone(work: SlotWork) -> None:
    """grouping=threads: a row no thread or reply links is a conversation of its own."""
    work.segments.extend(Segment([msg], StartedBy.THREAD) for msg in work.rest)
    work.rest = []


def apply_review(work: SlotWork) -> None:
    """d. The review's verdicts on gap-rule boundaries: merge, or keep as reviewed."""
    if not work.verdicts:
        return
    kept: Segment | None = None
    for segment, gap_before in work.gap_segments:
        verdict = work.verdicts.get(segment.messages[0].message_id)
        if kept is not None and gap_before is not None and verdict is True:
            kept.messages.extend(segment.messages)
            segment.messages = []
            continue
        if gap_before is not None and verdict is False:
            segment.started_by = StartedBy.REVIEW
        kept = segment
    work.segments = [s for s in work.segments if s.messages]


PIPELINES: dict[Grouping, tuple[Step, ...]] = {
    Grouping.AUTO: (join_threads, follow_replies, split_rest_at_gaps, apply_review),
    Grouping.THREADS: (join_threads, follow_replies, each_row_alone),
    Grouping.GAP: (split_rest_at_gaps, apply_review),
}


def segment_slot(messages: Sequence[Msg], options: GroupingOptions, *,
                 placed: Sequence[Segment] = (), stored: StoredLinks = NO_LINKS,
                 verdicts: Mapping[str, bool] | None = None,
                 split: Segmenter = split_at_gaps,
                 steps: Sequence[Step] | None = None) -> list[Segment]:
    """Run the slot's rows (time-ordered) through the pipeline of `options.grouping` (or
    `steps`); `placed` are conversations already known (rows pinned by session_id),
    which replies may join. Answers every segment, in order of their first rows."""
    if (steps is None and not placed and not verdicts and options.grouping != Grouping.THREADS
            and not any(m.thread_id or m.reply_to for m in messages)):
        # No threading field, no verdict: the pipeline is the gap rule (the usual slot)
        return [Segment(msgs, StartedBy.GAP) for msgs in split(messages, options.gap)]
    work = SlotWork(rest=list(messages), options=options, stored=stored,
                    verdicts=verdicts or {}, split=split, segments=list(placed))
    for step in steps if steps is not None else PIPELINES[options.grouping]:
        step(work)
    if work.rest:  # a pipeline without a final step: the gap rule places the rest
        split_rest_at_gaps(work)
    return sorted(work.segments, key=lambda s: _time_order(s.messages[0]))


@dataclass(frozen=True)
class Boundary:
    """A gap-rule boundary the review may judge: the rows on both sides of it."""

    key: str  # the id of the first row after it (what a verdict is filed under)
    gap: timedelta
    before: Sequence[Msg]
    after: Sequence[Msg]


def review_candidates(segments: Sequence[Segment], *, min_gap: timedelta,
                      max_gap: timedelta, context: int) -> list[Boundary]:
    """The gap-rule boundaries between consecutive gap segments whose gap lies in
    [min_gap, max_gap], each with up to `context` rows on either side."""
    gap_segments = [s for s in segments if s.started_by in (StartedBy.GAP, StartedBy.REVIEW)]
    found = []
    for before, after in zip(gap_segments, gap_segments[1:], strict=False):
        gap = after.messages[0].sent_at - before.messages[-1].sent_at
        if min_gap <= gap <= max_gap:
            found.append(Boundary(after.messages[0].message_id, gap,
                                  before.messages[-context:], after.messages[:context]))
    return found


def _time_order(msg: Msg) -> tuple[Any, int]:
    return (msg.sent_at, msg.line)
