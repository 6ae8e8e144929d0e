"""`AutoSessionManager.events()`: the live event stream from Python (SPEC §12) — events
arrive as they commit, in order, and a resume from a cursor misses and repeats nothing."""

from __future__ import annotations

import threading
import time

import pytest

from app.errors import ValidationFailed
from app.manager import AutoSessionManager, TaskType
from tests.api.test_event_stream import seed_event


def test_events_arrive_as_they_commit_and_resume_from_a_cursor(runtime) -> None:  # type: ignore[no-untyped-def]
    seed_event(runtime)  # a poller starting on an emptied table waits out a hole (README)
    manager = AutoSessionManager(runtime)
    stream = manager.events(idle_timeout=3)
    arrived: list[tuple[int, str, str | None]] = []
    reader = threading.Thread(target=lambda: arrived.extend(
        (e.event_id, e.type, e.session_id) for e in stream), daemon=True)
    reader.start()
    time.sleep(0.3)  # the stream starts at the newest event: only what follows
    made = []
    for shop in range(3):
        made.append(manager.create_robot_session(shop_id=shop, user_id="u1",
                                                 task_type=TaskType.CONSULTATION))
        committed = time.monotonic()
        deadline = committed + 1.0
        while not any(sid == made[-1].session_id for _, _, sid in arrived):
            assert time.monotonic() < deadline, "the event did not arrive within a second"
            time.sleep(0.01)
    reader.join(10)
    assert not reader.is_alive(), "idle_timeout did not end the iterator"
    assert [(t, sid) for _, t, sid in arrived] == [
        ("session.activated", s.session_id) for s in made]

    start = arrived[0][0] - 1
    ids = [e.event_id for e in manager.events(after=start, idle_timeout=0.5)]
    assert ids == [event_id for event_id, _, _ in arrived]
    middle = ids[len(ids) // 2]
    assert [e.event_id for e in manager.events(after=middle, idle_timeout=0.5)] == [
        i for i in ids if i > middle]


def test_a_bad_cursor_is_refused_naming_the_field(runtime) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationFailed) as refused:
        next(AutoSessionManager(runtime).events(after=-1))
    assert refused.value.problem()["errors"][0]["field"] == "after"
