"""Operator corrections benchmark (run by hand): merge and split of a 50k-message session.

    TEST_REDIS_URL=redis://127.0.0.1:6379/3 .venv/bin/python tests/benchmarks/bench_corrections.py \
        [--messages 50000] [--other 200000] [--rounds 3]

One slot holds a COMPLETED session of `--messages` messages and a small COMPLETED one
(10 messages); `--other` messages on 1,000 other sessions fill the table around them.
Each round times, through `app.sessions.corrections` (slot lock, fence, row locks,
audit rows, events, counters recomputed — what the admin API calls):

- split the big session at its middle message (half its messages move),
- merge the new half back (the same rows move back),
- merge the whole big session into the small one (every message moves), and back,

and, as the baseline, the bare statement that moves the same rows
(`UPDATE messages SET session_pk = … WHERE session_pk = …`, one transaction, nothing
else). Times are printed per step with their ratio to that baseline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import cast

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app import migrate  # noqa: E402
from app.config import load_settings  # noqa: E402
from app.db import utcnow  # noqa: E402
from app.messages.models import Message  # noqa: E402
from app.runtime import Runtime, build_runtime  # noqa: E402
from app.sessions.corrections import merge_sessions, split_session  # noqa: E402
from app.sessions.enums import SessionType  # noqa: E402
from app.sessions.models import Session  # noqa: E402
from app.sessions.schemas import SessionRequest  # noqa: E402

DB = "auto_session_bench_corrections" + (
    f"_{os.environ['TEST_DB_SUFFIX']}" if os.environ.get("TEST_DB_SUFFIX") else "")
SERVER = os.environ.get("TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/")
OPERATOR = "client:cli_bench_ops"
ROLES = ("counterpart", "robot", "human")
BATCH = 5_000


def timed[T](label: str, fn: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - started
    print(f"  {label:<44} {elapsed:7.3f} s", flush=True)
    return elapsed, result


def ended_session(rt: Runtime, account: str, shop: str) -> tuple[int, str]:
    sid = rt.sessions.create(SessionRequest(account_id=account, shop_id=shop,
                                            session_type=SessionType.AUTO_BARGAIN),
                             actor="client:bench").session.session_id
    rt.sessions.complete(sid, actor="client:bench")
    with rt.database.read() as db:
        pk = db.execute(sa.select(Session.id).where(Session.session_id == sid)).scalar_one()
    return pk, sid


def add_messages(rt: Runtime, pk: int, account: str, shop: str, n: int, prefix: str) -> None:
    """`n` messages a second apart on session `pk`, in batches, counters set after."""
    start = utcnow() - timedelta(days=3)
    table = cast(sa.Table, Message.__table__)
    with rt.database.engine.begin() as conn:
        for first in range(0, n, BATCH):
            conn.execute(sa.insert(table), [{
                "message_id": f"{prefix}-{i}", "session_pk": pk, "account_id": account,
                "shop_id": shop, "sender_role": ROLES[i % 3], "content": f"message {i} " * 4,
                "message_type": "text", "sent_at": start + timedelta(seconds=i),
                "received_at": start + timedelta(seconds=i)}
                for i in range(first, min(n, first + BATCH))])
        conn.execute(sa.update(Session).where(Session.id == pk).values(
            message_count=n, robot_message_count=n // 3, human_message_count=n // 3,
            counterpart_message_count=n - 2 * (n // 3), first_message_at=start,
            last_message_at=start + timedelta(seconds=n - 1)))


def plain_move(rt: Runtime, from_pk: int, to_pk: int) -> int:
    with rt.database.engine.begin() as conn:
        return int(conn.execute(sa.update(Message).where(Message.session_pk == from_pk)
                                .values(session_pk=to_pk)).rowcount)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--other", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    server = sa.create_engine(SERVER)
    with server.begin() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{DB}`")
        conn.exec_driver_sql(f"CREATE DATABASE `{DB}` CHARACTER SET utf8mb4")
    url = sa.engine.make_url(SERVER).set(database=DB).render_as_string(hide_password=False)
    migrate.upgrade(url)
    settings = load_settings(database_url=url, _env_file=None, data_dir=Path("/tmp"),
                             redis_url=os.environ.get("TEST_REDIS_URL",
                                                      "redis://127.0.0.1:6379/3"),
                             redis_key_prefix=f"bench-corrections-{os.getpid()}")
    rt = build_runtime(settings)
    rt._schema_checked = True
    try:
        print(f"seeding: {args.messages} + 10 messages on one slot, {args.other} elsewhere",
              flush=True)
        for i in range(1000):
            pk, _ = ended_session(rt, "acc-other", f"shop-{i}")
            add_messages(rt, pk, "acc-other", f"shop-{i}", args.other // 1000, f"o{i}")
        big_pk, big = ended_session(rt, "acc-1", "shop-1")
        add_messages(rt, big_pk, "acc-1", "shop-1", args.messages, "big")
        small_pk, small = ended_session(rt, "acc-1", "shop-1")
        add_messages(rt, small_pk, "acc-1", "shop-1", 10, "small")
        scratch_pk, _ = ended_session(rt, "acc-1", "shop-scratch")
        middle = f"big-{args.messages // 2}"

        figures: dict[str, list[float]] = {}

        def keep(label: str, seconds: float) -> None:
            figures.setdefault(label, []).append(seconds)

        for round_no in range(1, args.rounds + 1):
            print(f"round {round_no}", flush=True)
            seconds, _ = timed("plain UPDATE, all rows there and back (baseline)",
                                   lambda: (plain_move(rt, big_pk, scratch_pk),
                                            plain_move(rt, scratch_pk, big_pk)))
            keep("plain", seconds / 2)
            seconds, cut = timed(f"split at the middle ({args.messages // 2} move)",
                                 lambda: split_session(rt.sessions, big, at_message_id=middle,
                                                       actor=OPERATOR, reason="bench"))
            keep("split", seconds)
            half = cut.new_session.session_id
            seconds, _ = timed("merge the half back",
                               lambda: merge_sessions(rt.sessions, [half], into=big,  # noqa: B023
                                                      actor=OPERATOR, reason="bench"))
            keep("merge half", seconds)
            seconds, whole = timed(f"merge all {args.messages} into the small session",
                                   lambda: merge_sessions(rt.sessions, [big], into=small,
                                                          actor=OPERATOR, reason="bench"))
            keep("merge all", seconds)
            assert whole.session.message_count == args.messages + 10
            # back to the start (a merged session cannot be merged into again): the big
            # session's rows moved back by hand and its mark cleared; counters and times
            # are recomputed from the rows by the next correction anyway
            with rt.database.engine.begin() as conn:
                conn.execute(sa.update(Message).where(
                    Message.session_pk == small_pk, Message.message_id.like("big-%"))
                    .values(session_pk=big_pk))
                conn.execute(sa.update(Session).where(Session.id == big_pk)
                             .values(merged_into=None))

        plain = statistics.median(figures["plain"])
        print(f"\nmedians over {args.rounds} rounds ({args.messages} messages, "
              f"{args.other} elsewhere):")
        print(f"  {'plain UPDATE of all rows':<32} {plain:7.3f} s")
        for label in ("split", "merge half", "merge all"):
            value = statistics.median(figures[label])
            print(f"  {label:<32} {value:7.3f} s   {value / plain:5.2f}× the plain UPDATE")
    finally:
        rt.close()
        with server.begin() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{DB}`")
        server.dispose()


if __name__ == "__main__":
    main()
