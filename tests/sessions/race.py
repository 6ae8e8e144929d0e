"""A random workload of slot operations, for the race tests (threads and processes).

`python -m tests.sessions.race --slots 3 --ops 40 --threads 4 --seed 7` runs it against the
database/Redis named by the environment and prints one JSON line of counts.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
from collections import Counter
from typing import Any

from sqlalchemy import select

from app.errors import AutoSessionError
from app.runtime import Runtime, get_runtime
from app.sessions.models import Session
from app.sessions.schemas import SessionRequest
from app.transfers.schemas import TransferRequest

TYPES = [
    "AUTO_BARGAIN",
    "AUTO_FOLLOW_UP",
    "MANUAL_CUSTOMER_SERVICE",
    "MANUAL_COMPLAINT",
    "MANUAL_URGENT",
]
WEIGHTS = [5, 5, 2, 2, 1]


def slot_names(count: int) -> list[tuple[str, str]]:
    return [("race-acc", f"race-shop-{i}") for i in range(count)]


def one_operation(
    runtime: Runtime, rng: random.Random, slots: list[tuple[str, str]], actor: str
) -> str:
    """Do one random operation; return its outcome ('ok', or the problem type)."""
    service = runtime.sessions
    account, shop = rng.choice(slots)
    roll = rng.random()
    try:
        if roll < 0.45:
            kind = rng.choices(TYPES, WEIGHTS)[0]
            service.create(
                SessionRequest(
                    account_id=account,
                    shop_id=shop,
                    session_type=kind,
                    on_conflict=rng.choice(["queue", "queue", "reject"]),
                ),
                actor=actor,
            )
            return "ok"
        with runtime.database.read() as db:
            ids = db.execute(
                select(Session.session_id, Session.status).where(
                    Session.account_id == account,
                    Session.shop_id == shop,
                    Session.status.in_(["ACTIVE", "PAUSED", "PENDING", "TRANSFERRED"]),
                )
            ).all()
        if not ids:
            return "empty"
        session_id, _status = rng.choice(ids)
        action = rng.choice(
            ["complete", "complete", "cancel", "pause", "resume", "transfer", "heartbeat"]
        )
        if action == "complete":
            service.complete(session_id, actor=actor)
        elif action == "cancel":
            service.cancel(session_id, actor=actor)
        elif action == "pause":
            service.pause(session_id, actor=actor)
        elif action == "resume":
            service.resume(session_id, actor=actor)
        elif action == "transfer":
            service.transfer(session_id, TransferRequest(reason="race"), actor=actor)
        else:
            service.heartbeat(session_id, actor=actor)
        return "ok"
    except AutoSessionError as exc:
        return exc.type


def run_workload(
    runtime: Runtime, *, slots: int, ops: int, threads: int, seed: int, actor: str
) -> dict[str, Any]:
    names = slot_names(slots)
    outcomes: Counter[str] = Counter()
    crashes: list[str] = []
    guard = threading.Lock()

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        for _ in range(ops):
            try:
                outcome = one_operation(runtime, rng, names, actor)
            except Exception as exc:  # anything not a domain answer is a bug
                outcome = "crash"
                with guard:
                    crashes.append(repr(exc))
            with guard:
                outcomes[outcome] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return {"outcomes": dict(outcomes), "crashes": crashes[:5], "total": sum(outcomes.values())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, default=3)
    parser.add_argument("--ops", type=int, default=40)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    result = run_workload(
        get_runtime(),
        slots=args.slots,
        ops=args.ops,
        threads=args.threads,
        seed=args.seed,
        actor=f"process-{args.seed}",
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
