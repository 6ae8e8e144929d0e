"""Concurrency is the product: many threads and processes on a few slots at once.

Never two occupants (watched while the race runs, and enforced by the database),
every request answered, the audit trail consistent with the final statuses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa

from tests.sessions.helpers import innodb_deadlocks
from tests.sessions.invariants import check_final_state, double_occupants
from tests.sessions.race import run_workload

ALLOWED_ANSWERS = {
    "ok",
    "empty",
    "/problems/invalid-transition",
    "/problems/slot-occupied",
    "/problems/conflict",
    "/problems/not-found",
    "/problems/slot-busy",
}


class OccupancyWatch:
    """Samples the database while the race runs; remembers any double occupant seen."""

    def __init__(self, runtime) -> None:  # type: ignore[no-untyped-def]
        self.runtime = runtime
        self.seen: list[object] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen.extend(double_occupants(self.runtime))
            self.samples += 1
            time.sleep(0.01)

    def __enter__(self) -> OccupancyWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_threads_racing_on_few_slots_never_make_two_occupants(runtime):
    mysql = runtime.database.dialect == "mysql"
    deadlocks = innodb_deadlocks(runtime) if mysql else 0
    with OccupancyWatch(runtime) as watch:
        result = run_workload(runtime, slots=3, ops=25, threads=8, seed=11, actor="threads")
    if mysql:  # slot transactions lock one slot's rows, in one order: they only wait
        assert innodb_deadlocks(runtime) == deadlocks
    assert result["crashes"] == []
    assert result["total"] == 8 * 25
    assert set(result["outcomes"]) <= ALLOWED_ANSWERS, result["outcomes"]
    assert result["outcomes"].get("ok", 0) > 50
    assert watch.samples > 0 and watch.seen == []
    assert check_final_state(runtime) == []


@pytest.mark.services
def test_processes_and_threads_racing_against_mariadb_and_redis(runtime, backend):
    env = backend.env()
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.sessions.race",
                "--slots",
                "3",
                "--ops",
                "30",
                "--threads",
                "4",
                "--seed",
                str(seed),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (101, 202)
    ]
    with OccupancyWatch(runtime) as watch:
        local = run_workload(runtime, slots=3, ops=30, threads=6, seed=303, actor="threads")
        reports = []
        for proc in workers:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-2000:]
            reports.append(json.loads(out.strip().splitlines()[-1]))
    for report in [local, *reports]:
        assert report["crashes"] == []
        assert set(report["outcomes"]) <= ALLOWED_ANSWERS, report["outcomes"]
    assert local["total"] == 6 * 30
    assert [r["total"] for r in reports] == [4 * 30, 4 * 30]
    assert sum(r["outcomes"].get("ok", 0) for r in [local, *reports]) > 100
    assert watch.seen == [] and watch.samples > 0
    assert check_final_state(runtime) == []


@pytest.mark.services
def test_creates_joining_a_hot_slots_line_race_its_changes_and_strand_nobody(runtime):
    """Creates on a busy slot join its line without the slot lock (the slot row held
    shared) while other threads end whoever holds the slot, over and over: never two
    occupants, never a free slot with sessions waiting, every create answered."""
    from app.errors import AutoSessionError
    from app.sessions.slot import SlotFence
    from tests.sessions.helpers import ask

    service = runtime.sessions
    ask(service, "AUTO_BARGAIN", shop="hot")  # the first create takes the slot
    stop = threading.Event()
    created: list[str] = []
    ended: list[str] = []
    problems: list[BaseException] = []

    def creator(n: int) -> None:
        for i in range(25):
            try:
                out = ask(service, "AUTO_FOLLOW_UP" if (n + i) % 2 else "AUTO_BARGAIN",
                          shop="hot", actor=f"creator-{n}")
                created.append(out.session.status)
            except BaseException as exc:  # noqa: BLE001 - collected and asserted on
                problems.append(exc)

    def ender() -> None:
        while not stop.is_set():
            with runtime.database.read() as db:
                occupant = SlotFence(db, "acc-1", "hot").occupant_session_id
            if occupant is None:
                time.sleep(0.002)
                continue
            try:
                service.complete(occupant, actor="ender")
                ended.append(occupant)
            except AutoSessionError:
                pass  # ended by the other ender first
            time.sleep(0.005)

    with OccupancyWatch(runtime) as watch:
        enders = [threading.Thread(target=ender) for _ in range(2)]
        creators = [threading.Thread(target=creator, args=(n,)) for n in range(6)]
        for t in enders + creators:
            t.start()
        for t in creators:
            t.join(120)
        stop.set()
        for t in enders:
            t.join(30)
    assert problems == []
    assert len(created) == 6 * 25 and "PENDING" in created and ended
    assert watch.seen == [] and watch.samples > 0
    assert check_final_state(runtime) == []
    with runtime.database.read() as db:
        fence = SlotFence(db, "acc-1", "hot").value
    # Every change of the slot advanced the fence; the creates that only joined the
    # line did not (they ran beside each other, without the slot lock).
    changes = 1 + len(ended) + created.count("ACTIVE")
    assert fence < changes + created.count("PENDING")


# ---- the live desk (SPEC §12) -------------------------------------------------------------
@pytest.mark.services
def test_hand_back_racing_an_urgent_takeover_has_exactly_one_winner(runtime):
    """A desk hands a transferred session back to its robot while an urgent human takes
    the slot: either the hand-back commits first (the old session COMPLETED, the bot's new
    session opened and then interrupted by the urgent one) or the takeover does (the
    transferred session CANCELLED, its transfer cancelled, and the hand-back refused with
    409) — never both, never neither, never two occupants."""
    import random

    from app.errors import InvalidTransition
    from app.transfers.schemas import HandBackRequest, TransferRequest
    from tests.sessions.helpers import ask

    service = runtime.sessions
    rng = random.Random(17)
    outcomes: list[str] = []

    def play(round_no: int) -> None:
        shop = f"handback-{round_no}"
        robot = ask(service, "AUTO_BARGAIN", shop=shop, actor="bot").session
        transfer = service.transfer(robot.session_id, TransferRequest(reason="refund"),
                                    actor="bot")
        service.accept_transfer(transfer.transfer_id, agent_id="a1", actor="desk")
        start = threading.Barrier(2)
        answers: dict[str, object] = {}

        def hand_back(sid: str = robot.session_id) -> None:
            start.wait()
            time.sleep(rng.random() * 0.004)
            try:
                answers["hand_back"] = service.hand_back(sid, HandBackRequest(
                    summary="sorted", outcome="needs_robot", agent_id="a1"), actor="desk")
            except InvalidTransition as exc:
                answers["hand_back"] = exc

        def takeover(shop: str = shop) -> None:
            start.wait()
            time.sleep(rng.random() * 0.004)
            answers["urgent"] = ask(service, "MANUAL_URGENT", shop=shop, actor="desk")

        threads = [threading.Thread(target=hand_back), threading.Thread(target=takeover)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        urgent = answers["urgent"].session  # type: ignore[attr-defined]
        assert urgent.status == "ACTIVE"
        old = service.get(robot.session_id)
        handed = answers["hand_back"]
        if isinstance(handed, InvalidTransition):
            outcomes.append("takeover first")
            assert old.status == "CANCELLED" and old.handed_back_to is None
            assert urgent.interrupted_session_id == robot.session_id
            assert service.get_transfer(transfer.transfer_id).status == "CANCELLED"
        else:
            outcomes.append("hand-back first")
            resumed = handed.resumed  # type: ignore[attr-defined]
            assert old.status == "COMPLETED" and old.handed_back_to == resumed.session_id
            assert service.get_transfer(transfer.transfer_id).status == "COMPLETED"
            assert urgent.interrupted_session_id == resumed.session_id
            assert service.get(resumed.session_id).status == "PAUSED"

    with OccupancyWatch(runtime) as watch:
        for round_no in range(16):
            play(round_no)
    assert watch.seen == [] and watch.samples > 0
    assert check_final_state(runtime) == []
    assert len(outcomes) == 16
    print("hand-back vs takeover:", {o: outcomes.count(o) for o in set(outcomes)})


@pytest.mark.services
def test_the_reply_lock_racing_a_reassign(runtime):
    """Two agents post human messages on an accepted transfer while it is reassigned from
    the first to the second: every message of the first was stored before the reassign,
    every message of the second after it, every other one refused with not-assignee."""
    from app.api.access import control_of
    from app.audit.models import Operation
    from app.clients.service import ClientIdentity, ClientRole
    from app.db import utcnow
    from app.errors import AutoSessionError, NotAssignee
    from app.messages.models import Message
    from app.messages.service import LiveMessage
    from app.sessions.enums import SenderRole
    from app.transfers.schemas import TransferRequest
    from tests.sessions.helpers import ask

    select = sa.select
    service = runtime.sessions
    desk = ClientIdentity(client_id="cli_desk", name="desk", role=ClientRole.DESK)
    robot = ask(service, "AUTO_BARGAIN", shop="reply-race", actor="bot").session
    transfer = service.transfer(robot.session_id, TransferRequest(reason="help"), actor="bot")
    service.accept_transfer(transfer.transfer_id, agent_id="a1", actor="desk")
    stop = threading.Event()
    answers: list[tuple[str, str, str]] = []  # (agent, outcome, message id or error)
    guard = threading.Lock()
    counter = iter(range(1_000_000))

    def poster(agent: str) -> None:
        while not stop.is_set():
            with guard:
                mid = f"{agent}-{next(counter)}"
            try:
                service.record_messages(robot.session_id, [LiveMessage(
                    message_id=mid, sender_role=SenderRole.HUMAN, content="hello",
                    sent_at=utcnow())], actor=desk.actor, agent_id=agent, as_operator=False,
                    control=control_of(desk, messages=True))
                outcome = (agent, "accepted", mid)
            except NotAssignee:
                outcome = (agent, "refused", "not-assignee")
            except AutoSessionError as exc:
                outcome = (agent, "other", exc.type)
            with guard:
                answers.append(outcome)

    threads = [threading.Thread(target=poster, args=(agent,))
               for agent in ("a1", "a2") for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.4)
    service.reassign_transfer(transfer.transfer_id, agent_id="a2", actor="desk",
                              reason="a1 is overloaded")
    time.sleep(0.4)
    stop.set()
    for t in threads:
        t.join(30)

    assert [a for a in answers if a[1] == "other"] == []
    by = {(agent, outcome): [a[2] for a in answers if a[:2] == (agent, outcome)]
          for agent in ("a1", "a2") for outcome in ("accepted", "refused")}
    assert all(by.values()), {k: len(v) for k, v in by.items()}  # both sides of the change
    with runtime.database.read() as db:
        moment = db.execute(select(Operation.created_at).where(
            Operation.session_id == robot.session_id,
            Operation.operation == "transfer-reassign")).scalar_one()
        stored = dict(db.execute(select(Message.message_id, Message.received_at)).all())
    assert set(by[("a1", "accepted")]) | set(by[("a2", "accepted")]) == set(stored)
    assert all(stored[mid] <= moment for mid in by[("a1", "accepted")])
    assert all(stored[mid] >= moment for mid in by[("a2", "accepted")])
