"""Sweep benchmark (run by hand): N sessions in MariaDB, N/10 past their deadline.

    TEST_REDIS_URL=redis://127.0.0.1:6379/3 .venv/bin/python tests/benchmarks/bench_sweep.py \
        [--sessions 1000000] [--due-every 10] [--batch 500] [--rounds 2] \
        [--in-flight 1] [--buffer-pool-mb 2048] [--profile FILE] [--reuse]

Every session is an ACTIVE robot session on its own slot, occupying it (slot row
with fence 1, one prior audit row). Bulk-generated with SQL (MariaDB's sequence
engine). Two things are timed on the same rows, in the same run:

- the baseline, one plain `UPDATE sessions SET status='TIMEOUT', … WHERE
  status='ACTIVE' AND deadline_at <= now` (no audit, no events, no fence, no locks);
- one full sweep (`sweep_sessions`): slot locks, re-check under them, conditional
  updates, fence bumps, hash-chained audit rows and `session.timeout` events.

To be fair to both, they alternate — plain, sweep, plain, sweep, …, plain — after
an untimed warm-up plain UPDATE, and each timed step starts from the same state:
everything the previous step wrote is undone, and the server is let settle (purge
of old row versions done, the tables' dirty pages written) so neither pays for the
other's background work. Each sweep is compared with the mean of the plain UPDATEs just
before and after it. The MariaDB settings that decide the figures are printed;
`--buffer-pool-mb` resizes the buffer pool for the run (SET GLOBAL, restored at
exit) to measure with the data in memory, as a production server would have it.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app import migrate  # noqa: E402
from app.config import Settings, load_settings  # noqa: E402
from app.runtime import Runtime, build_runtime  # noqa: E402
from app.sweeps.service import BATCHES_IN_FLIGHT, sweep_sessions  # noqa: E402

DB = "auto_session_bench_sweep" + (
    f"_{os.environ['TEST_DB_SUFFIX']}" if os.environ.get("TEST_DB_SUFFIX") else "")
SETTINGS_SHOWN = ("version", "innodb_buffer_pool_size", "innodb_flush_log_at_trx_commit",
                  "innodb_log_file_size", "innodb_change_buffering", "innodb_doublewrite",
                  "innodb_flush_method", "innodb_io_capacity", "sync_binlog", "log_bin")


def timed[T](label: str, fn: Callable[[], T]) -> tuple[float, T]:
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


def restore(engine: sa.Engine, now: datetime) -> None:
    """Undo a plain UPDATE or a sweep: the due rows ACTIVE and due again, their slots
    occupied at fence 1, no timeout audit rows, no events."""
    past = (now - timedelta(hours=1)).replace(tzinfo=None)
    created = (now - timedelta(hours=2)).replace(tzinfo=None)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "UPDATE sessions SET status='ACTIVE', holds_slot=1, ended_at=NULL, "
            "end_reason=NULL, deadline_at=:past WHERE status='TIMEOUT'"), {"past": past})
        conn.execute(sa.text(
            "UPDATE slots SET fence=1, occupant_session_id=CONCAT('ses_b', SUBSTRING(shop_id, 6)),"
            " updated_at=:created WHERE fence <> 1"), {"created": created})
        conn.exec_driver_sql("DELETE FROM session_operations WHERE operation='timeout'")
        conn.exec_driver_sql("DELETE FROM events")


def settle(engine: sa.Engine, *, limit: float = 120.0) -> None:
    """Wait until InnoDB has purged old row versions, then write the tables' dirty pages
    out (`FLUSH TABLES … FOR EXPORT`), so the next timed step pays for none of the
    previous step's background work."""
    started = time.monotonic()
    with engine.connect() as conn:
        while time.monotonic() - started < limit:
            history = int(conn.exec_driver_sql(
                "SHOW GLOBAL STATUS LIKE 'Innodb_history_list_length'").one()[1])
            if history < 100:
                break
            time.sleep(0.5)
        conn.exec_driver_sql(
            "FLUSH TABLES sessions, slots, session_operations, events FOR EXPORT")
        conn.exec_driver_sql("UNLOCK TABLES")
    print(f"{'  (settled: purge done, dirty pages written)':<48} "
          f"{time.monotonic() - started:8.2f} s", flush=True)


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


def show_server(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        values = dict(conn.exec_driver_sql(
            "SELECT 'version', @@version UNION ALL " + " UNION ALL ".join(
                f"SELECT '{name}', @@global.{name}" for name in SETTINGS_SHOWN[1:])).all())
        sizes = conn.execute(sa.text(
            "SELECT table_name, ROUND((data_length + index_length) / 1048576) FROM "
            "information_schema.tables WHERE table_schema = :db AND table_name IN "
            "('sessions', 'slots', 'session_operations') ORDER BY table_name"), {"db": DB}).all()
    pool = int(values["innodb_buffer_pool_size"])
    print("MariaDB: " + ", ".join(
        f"{name}={values[name]}" + (f" ({pool // 1048576} MiB)" if name.endswith("pool_size")
                                    else "") for name in SETTINGS_SHOWN))
    print("table sizes (data + indexes): " + ", ".join(f"{t} {mb} MiB" for t, mb in sizes))


@contextlib.contextmanager
def buffer_pool(engine: sa.Engine, megabytes: int | None) -> Iterator[None]:
    """Resize the buffer pool for the run (it is dynamic), then put it back."""
    if not megabytes:
        yield
        return

    def resize(size: int) -> None:
        """Set the size and wait until the pool has it (the resize runs in the background)."""
        with engine.connect() as conn:
            conn.exec_driver_sql(f"SET GLOBAL innodb_buffer_pool_size = {int(size)}")
            page = int(conn.exec_driver_sql("SELECT @@innodb_page_size").scalar_one())
            for _ in range(600):
                pages = int(conn.exec_driver_sql(
                    "SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_pages_total'").one()[1])
                if abs(pages * page - size) < size // 10:
                    break
                time.sleep(0.2)

    with engine.connect() as conn:
        original = int(conn.exec_driver_sql("SELECT @@global.innodb_buffer_pool_size")
                       .scalar_one())
    resize(megabytes * 1048576)
    try:
        yield
    finally:
        resize(original)
        print(f"(buffer pool restored to {original // 1048576} MiB)")


def run_sweep(runtime: Runtime, now: datetime, profile: str | None,
              in_flight: int | None) -> Any:
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    try:
        return sweep_sessions(runtime, now=now, time_budget=3600, in_flight=in_flight)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--due-every", type=int, default=10)
    parser.add_argument("--batch", type=int, default=Settings().sweep_batch_size,
                        help="sessions per batch (default: SWEEP_BATCH_SIZE's default)")
    parser.add_argument("--in-flight", type=int, default=None,
                        help="batches the sweep expires at once (default: BATCHES_IN_FLIGHT)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="timed sweeps; each is preceded and followed by a timed plain UPDATE")
    parser.add_argument("--buffer-pool-mb", type=int, default=None,
                        help="SET GLOBAL innodb_buffer_pool_size for the run (restored after)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the benchmark database if it holds --sessions rows")
    parser.add_argument("--profile", metavar="FILE",
                        help="run the (last) sweep under cProfile and write its stats to FILE"
                        " (the calling thread only: add --in-flight 1, or use py-spy)")
    parser.add_argument("--server", default=os.environ.get(
        "TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/"))
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    redis_url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    server = sa.make_url(args.server)
    admin = sa.create_engine(server)
    url = server.set(database=DB).render_as_string(hide_password=False)
    with admin.begin() as conn:
        exists = conn.exec_driver_sql(
            f"SELECT COUNT(*) FROM information_schema.tables WHERE table_schema='{DB}' "
            "AND table_name='sessions'").scalar_one()
        reuse = bool(args.reuse and exists and conn.exec_driver_sql(
            f"SELECT COUNT(*) FROM `{DB}`.sessions").scalar_one() == args.sessions)
        if not reuse:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{DB}`")
            conn.exec_driver_sql(f"CREATE DATABASE `{DB}` CHARACTER SET utf8mb4")
    if not reuse:
        migrate.upgrade(url)
    settings = load_settings(database_url=url, redis_url=redis_url,
                             redis_key_prefix="bench-sweep", sweep_batch_size=args.batch,
                             _env_file=None)
    runtime = build_runtime(settings)
    engine = runtime.database.engine
    # With --reuse the rows keep the deadlines they were generated with: sweep as of then.
    now = datetime.now(UTC)
    if reuse:
        with engine.connect() as conn:
            now = conn.exec_driver_sql(
                "SELECT MAX(last_activity_at) FROM sessions").scalar_one().replace(
                tzinfo=UTC) + timedelta(hours=2)
    due = args.sessions // args.due_every
    print(f"sessions: {args.sessions:,}, past their deadline: {due:,}, batch: {args.batch}, "
          f"batches in flight: {args.in_flight or BATCHES_IN_FLIGHT}, rounds: {args.rounds}")
    if reuse:
        timed("(reusing the rows: restore them)", lambda: restore(engine, now))
    else:
        timed("generate rows (sessions, slots, audit)", lambda: generate(
            engine, args.sessions, args.due_every, now))
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE TABLE sessions, slots, session_operations, events")
    cutoff = now.replace(tzinfo=None)

    def plain_update() -> int:
        with engine.begin() as conn:
            return int(conn.execute(sa.text(
                "UPDATE sessions SET status='TIMEOUT', holds_slot=NULL, ended_at=:now, "
                "end_reason='timeout', deadline_at=NULL "
                "WHERE status='ACTIVE' AND deadline_at <= :now"), {"now": cutoff}).rowcount)

    plains: list[float] = []
    sweeps: list[float] = []
    ok = True
    with buffer_pool(engine, args.buffer_pool_mb):
        show_server(engine)
        timed("(warm-up: plain UPDATE, untimed)", plain_update)
        timed("(undo it)", lambda: restore(engine, now))
        for round_no in range(args.rounds + 1):
            settle(engine)
            elapsed, changed = timed(f"plain UPDATE of the due rows #{round_no + 1}",
                                     plain_update)
            assert changed == due, changed
            plains.append(elapsed)
            timed("(undo it)", lambda: restore(engine, now))
            if round_no == args.rounds:
                break
            settle(engine)
            runtime.redis.flushdb()  # type: ignore[union-attr]
            profile = args.profile if round_no == args.rounds - 1 else None
            elapsed, report = timed(f"full sweep (sweep_sessions) #{round_no + 1}",
                                    lambda: run_sweep(runtime, now, profile,  # noqa: B023
                                                      args.in_flight))
            sweeps.append(elapsed)
            found = counts(engine)
            good = (len(report.timed_out) == found["timeout_sessions"] == due
                    == found["timeout_audit_rows"] == found["timeout_events"]
                    == found["fences_bumped"]
                    and found["occupied_slots"] == args.sessions - due
                    and report.busy == report.errors == 0)
            ok = ok and good
            print(f"  timed out {len(report.timed_out):,}, busy {report.busy}, errors "
                  f"{report.errors}; {found}; rules honoured: {'yes' if good else 'NO'}")
            timed("(undo it)", lambda: restore(engine, now))
        show_server(engine)

    print("plain UPDATE: " + ", ".join(f"{p:.2f} s" for p in plains)
          + f" (mean {statistics.fmean(plains):.2f} s)")
    print("full sweep:   " + ", ".join(f"{s:.2f} s" for s in sweeps)
          + f" (mean {statistics.fmean(sweeps):.2f} s)")
    ratios = [s / statistics.fmean(plains[i:i + 2]) for i, s in enumerate(sweeps)]
    print("ratio of each sweep to the plain UPDATEs either side of it: "
          + ", ".join(f"{r:.2f}x" for r in ratios))
    print(f"ratio sweep / plain UPDATE: {statistics.fmean(sweeps) / statistics.fmean(plains):.2f}x"
          " (means; aim <= 3x)")
    print("slot rules honoured (timeouts, audit, events, fences, occupancy):",
          "yes" if ok else "NO")
    runtime.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
