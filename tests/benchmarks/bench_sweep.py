"""Sweep benchmark (run by hand): N sessions in MariaDB, N/10 past their deadline.

    TEST_REDIS_URL=redis://127.0.0.1:6379/3 .venv/bin/python tests/benchmarks/bench_sweep.py \
        [--sessions 1000000] [--due-every 10] [--batch 2000]

Every session is an ACTIVE robot session on its own slot, occupying it (slot row
with fence 1, one prior audit row). Bulk-generated with SQL (MariaDB's sequence
engine). Measured in the same run, on the same rows:

1. one plain `UPDATE sessions SET status='TIMEOUT', … WHERE status='ACTIVE' AND
   deadline_at <= now` (no audit, no events, no fence, no locks) — then undone;
2. one full sweep (`sweep_sessions`): slot locks, re-check, conditional updates,
   fence bumps, hash-chained audit rows and `session.timeout` events.

Prints both times and their ratio, then checks the slot rules were honoured.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app import migrate  # noqa: E402
from app.config import load_settings  # noqa: E402
from app.runtime import build_runtime  # noqa: E402
from app.sweeps.service import sweep_sessions  # noqa: E402

DB = "auto_session_bench_sweep" + (
    f"_{os.environ['TEST_DB_SUFFIX']}" if os.environ.get("TEST_DB_SUFFIX") else "")


def timed(label: str, fn):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - started
    print(f"{label:<48} {elapsed:8.2f} s", flush=True)
    return elapsed, result


def generate(engine: sa.Engine, n: int, due_every: int, now: datetime) -> None:
    past = (now - timedelta(hours=1)).replace(tzinfo=None)
    future = (now + timedelta(hours=1)).replace(tzinfo=None)
    created = (now - timedelta(hours=2)).replace(tzinfo=None)
    params = {"past": past, "future": future, "created": created, "due": due_every}
    with engine.begin() as conn:
        conn.exec_driver_sql("SET SESSION unique_checks=0")
        conn.execute(sa.text(f"""
            INSERT INTO sessions (id, session_id, account_id, shop_id, session_type, task_type,
              priority, status, holds_slot, owner_id, client_id, origin, created_at,
              requested_at, activated_at, last_activity_at, deadline_at, message_count,
              robot_message_count, human_message_count, counterpart_message_count, unanswered)
            SELECT seq, CONCAT('ses_b', seq), CONCAT('acc-', seq MOD 1000), CONCAT('shop-', seq),
              'AUTO_BARGAIN', 'negotiation', 3, 'ACTIVE', 1, 'bot-1', 'cli_bench', 'live',
              :created, :created, :created, :created,
              IF(seq MOD :due = 0, :past, :future), 0, 0, 0, 0, 0
            FROM seq_1_to_{n}"""), params)
        conn.execute(sa.text(f"""
            INSERT INTO slots (account_id, shop_id, fence, occupant_session_id, updated_at)
            SELECT CONCAT('acc-', seq MOD 1000), CONCAT('shop-', seq), 1, CONCAT('ses_b', seq),
              :created FROM seq_1_to_{n}"""), params)
        conn.execute(sa.text(f"""
            INSERT INTO session_operations (session_pk, session_id, operation, from_status,
              to_status, actor, created_at, row_hash)
            SELECT seq, CONCAT('ses_b', seq), 'create', NULL, 'ACTIVE', 'bench', :created,
              SHA2(CONCAT('ses_b', seq), 256) FROM seq_1_to_{n}"""), params)


def counts(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            "timeout_sessions": conn.exec_driver_sql(
                "SELECT COUNT(*) FROM sessions WHERE status='TIMEOUT'").scalar_one(),
            "timeout_audit_rows": conn.exec_driver_sql(
                "SELECT COUNT(*) FROM session_operations WHERE operation='timeout'").scalar_one(),
            "timeout_events": conn.exec_driver_sql(
                "SELECT COUNT(*) FROM events WHERE type='session.timeout'").scalar_one(),
            "fences_bumped": conn.exec_driver_sql(
                "SELECT COUNT(*) FROM slots WHERE fence=2 AND occupant_session_id IS NULL"
            ).scalar_one(),
            "occupied_slots": conn.exec_driver_sql(
                "SELECT COUNT(*) FROM sessions WHERE holds_slot=1").scalar_one(),
        }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--due-every", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--profile", metavar="FILE",
                        help="run the sweep under cProfile and write its stats to FILE")
    parser.add_argument("--server", default=os.environ.get(
        "TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/"))
    args = parser.parse_args()
    redis_url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    server = sa.make_url(args.server)
    admin = sa.create_engine(server)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{DB}`")
        conn.exec_driver_sql(f"CREATE DATABASE `{DB}` CHARACTER SET utf8mb4")
    url = server.set(database=DB).render_as_string(hide_password=False)
    migrate.upgrade(url)
    settings = load_settings(database_url=url, redis_url=redis_url,
                             redis_key_prefix="bench-sweep", sweep_batch_size=args.batch,
                             _env_file=None)
    runtime = build_runtime(settings)
    engine = runtime.database.engine
    now = datetime.now(UTC)
    due = args.sessions // args.due_every
    print(f"sessions: {args.sessions:,}, past their deadline: {due:,}, batch: {args.batch}")
    timed("generate rows (sessions, slots, audit)", lambda: generate(
        engine, args.sessions, args.due_every, now))
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE TABLE sessions, slots, session_operations")

    cutoff = now.replace(tzinfo=None)

    def plain_update() -> int:
        with engine.begin() as conn:
            return conn.execute(sa.text(
                "UPDATE sessions SET status='TIMEOUT', holds_slot=NULL, ended_at=:now, "
                "end_reason='timeout', deadline_at=NULL "
                "WHERE status='ACTIVE' AND deadline_at <= :now"), {"now": cutoff}).rowcount

    plain, changed = timed("plain UPDATE of the due rows", plain_update)
    assert changed == due, changed

    def undo() -> None:
        with engine.begin() as conn:
            conn.execute(sa.text(
                "UPDATE sessions SET status='ACTIVE', holds_slot=1, ended_at=NULL, "
                "end_reason=NULL, deadline_at=:past WHERE status='TIMEOUT'"),
                {"past": (now - timedelta(hours=1)).replace(tzinfo=None)})

    timed("(undo the plain UPDATE)", undo)
    runtime.redis.flushdb()  # type: ignore[union-attr]
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    sweep, report = timed("full sweep (sweep_sessions)", lambda: sweep_sessions(
        runtime, now=now, time_budget=3600))
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    print(f"timed out: {len(report.timed_out):,}, busy: {report.busy}, errors: {report.errors}")
    print(f"ratio sweep / plain UPDATE: {sweep / plain:.2f}x (aim <= 3x)")
    found = counts(engine)
    print(found)
    ok = (found["timeout_sessions"] == due == found["timeout_audit_rows"]
          == found["timeout_events"] == found["fences_bumped"]
          and found["occupied_slots"] == args.sessions - due)
    print("slot rules honoured (audit, events, fence, occupancy):", "yes" if ok else "NO")
    runtime.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
