"""Retention benchmark (run by hand, MariaDB + Redis): purge 1,000,000 old events while
creates run, and see what the purge does to them.

    TEST_REDIS_URL=redis://127.0.0.1:6379/3 .venv/bin/python tests/benchmarks/bench_retention.py \
        [--events 1000000] [--threads 4] [--phase 0] [--batch 5000]

1. A fresh database gets `--events` events eight days old (MariaDB's sequence engine,
   each with a session snapshot like a real `session.activated`), settled.
2. Creates on distinct free slots (the full slot transaction: slot lock in Redis,
   fence, session, audit row, event — the statements that append to `events`) run in
   `--threads` threads of this process, back to back, in three phases: alone
   (`--phase` seconds, default 20), during the purge, and alone again as long.
3. The purge (`app.retention.service.purge_expired`, beat's code at the shipped batch
   size and rest) runs in a separate process, so it competes for the database and the cores,
   not for this process's GIL.

Printed: the purge's time, rows/s and longest batch transaction; each phase's create
count, p50 and p99 latency. The purge must never block a create: a batch deletes
only old rows, MySQL runs at READ COMMITTED (no gap locks), and no slot lock is held.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app import migrate  # noqa: E402
from app.config import Settings, load_settings  # noqa: E402
from app.retention.service import PAUSE_RATIO, PURGE_BATCH  # noqa: E402
from app.runtime import build_runtime  # noqa: E402
from app.sessions.enums import SessionType  # noqa: E402
from app.sessions.schemas import SessionRequest  # noqa: E402

DB = "auto_session_bench_retention" + (
    f"_{os.environ['TEST_DB_SUFFIX']}" if os.environ.get("TEST_DB_SUFFIX") else "")
SERVER = os.environ.get("TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/")


def settings() -> Settings:
    url = sa.engine.make_url(SERVER).set(database=DB).render_as_string(hide_password=False)
    return load_settings(_env_file=None, database_url=url,
                         redis_url=os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/3"),
                         redis_key_prefix="bench-retention",
                         rate_limit_enabled=False)


def prepare(events: int) -> None:
    server = sa.create_engine(SERVER)
    with server.begin() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{DB}`")
        conn.exec_driver_sql(f"CREATE DATABASE `{DB}` CHARACTER SET utf8mb4")
    server.dispose()
    config = settings()
    assert config.database_url is not None
    migrate.upgrade(config.database_url)
    engine = sa.create_engine(config.database_url)
    old = (datetime.now(UTC) - timedelta(days=8)).replace(tzinfo=None)
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sa.text(f"""
            INSERT INTO events (type, session_id, account_id, shop_id, client_id, audience,
                                occurred_at, data)
            SELECT 'session.activated', CONCAT('ses_old', seq), CONCAT('acc-', seq MOD 1000),
              CONCAT('shop-', seq), 'cli_bench', 'owner', :old,
              JSON_OBJECT('session_id', CONCAT('ses_old', seq), 'account_id',
                CONCAT('acc-', seq MOD 1000), 'shop_id', CONCAT('shop-', seq),
                'session_type', 'AUTO_BARGAIN', 'status', 'ACTIVE', 'priority', 3,
                'owner_id', 'bot-1', 'origin', 'live', 'previous_status', 'PENDING',
                'reason', NULL)
            FROM seq_1_to_{int(events)}"""), {"old": old})
    print(f"generated {events:,} events in {time.perf_counter() - started:.1f} s", flush=True)
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE TABLE events")
        size = conn.execute(sa.text(
            "SELECT data_length + index_length FROM information_schema.tables"
            " WHERE table_schema = :db AND table_name = 'events'"), {"db": DB}).scalar_one()
    print(f"events table: {size / 2**20:.0f} MiB", flush=True)
    engine.dispose()
    time.sleep(5)  # let the server write its dirty pages before measuring


def purge_process(batch: int, pause: float, out: Any, started_event: Any) -> None:
    from app.retention.service import purge_expired

    config = settings()
    runtime = build_runtime(config)
    started_event.set()  # the process is up: the "during" phase starts now
    started = time.perf_counter()
    report = purge_expired(runtime.database, events_retention=config.events_retention,
                           deliveries_retention=config.deliveries_retention,
                           time_budget=3600, batch=batch, pause_ratio=pause)
    out.put({"seconds": time.perf_counter() - started, "events": report.events,
             "batches": len(report.batches), "longest_batch": max(report.batches, default=0),
             "median_batch": statistics.median(report.batches) if report.batches else 0})
    runtime.close()


class CreateLoad:
    """Creates on fresh slots from `threads` threads until stopped; latencies by phase."""

    def __init__(self, threads: int) -> None:
        self.runtime = build_runtime(settings())
        self.threads = threads
        self.phase = "warm-up"
        self.latencies: dict[str, list[float]] = {}
        self.errors = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.workers = [threading.Thread(target=self.run, args=(i,), daemon=True)
                        for i in range(threads)]

    def run(self, worker: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            request = SessionRequest(account_id=f"acc-w{worker}", shop_id=f"shop-{n}",
                                     session_type=SessionType.AUTO_BARGAIN)
            started = time.perf_counter()
            try:
                self.runtime.sessions.create(request, actor="client:bench")
            except Exception:
                with self.lock:
                    self.errors += 1
                continue
            elapsed = time.perf_counter() - started
            with self.lock:
                self.latencies.setdefault(self.phase, []).append(elapsed)

    def __enter__(self) -> CreateLoad:
        for worker in self.workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for worker in self.workers:
            worker.join(30)
        self.runtime.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--phase", type=float, default=0.0,
                        help="seconds of each create-only phase (0: the purge's duration)")
    parser.add_argument("--batch", type=int, default=PURGE_BATCH)
    parser.add_argument("--pause", type=float, default=PAUSE_RATIO,
                        help="rest after each batch, as a multiple of the batch's time")
    args = parser.parse_args()

    prepare(args.events)
    spawn = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[Any] = spawn.Queue()
    purge_started = spawn.Event()
    with CreateLoad(args.threads) as load:
        time.sleep(5)  # warm-up: connections, compiled statements
        load.phase = "before"
        before_started = time.perf_counter()
        time.sleep(args.phase or 20)
        before_seconds = time.perf_counter() - before_started
        load.phase = "spawning"
        purge = spawn.Process(target=purge_process, args=(args.batch, args.pause, results,
                                                           purge_started))
        purge.start()
        purge_started.wait(300)
        load.phase = "during"
        during_started = time.perf_counter()
        purge.join()
        during_seconds = time.perf_counter() - during_started
        load.phase = "after"
        time.sleep(args.phase or before_seconds)
        after_seconds = before_seconds if not args.phase else args.phase
    report = results.get(timeout=10)
    print(f"\npurge: {report['events']:,} events in {report['seconds']:.1f} s "
          f"({report['events'] / report['seconds']:,.0f} rows/s), {report['batches']} batches "
          f"of {args.batch} (rest {args.pause:g}x), median "
          f"{report['median_batch'] * 1000:.0f} ms, longest "
          f"{report['longest_batch'] * 1000:.0f} ms", flush=True)
    print(f"creates ({args.threads} threads, distinct free slots), errors: {load.errors}")
    print(f"{'phase':<8} {'seconds':>8} {'creates':>8} {'per s':>7} {'p50 ms':>7} {'p99 ms':>7}"
          f" {'max ms':>7}")
    for phase, seconds in (("before", before_seconds), ("during", during_seconds),
                           ("after", after_seconds)):
        values = load.latencies.get(phase, [])
        if not values:
            continue
        print(f"{phase:<8} {seconds:8.1f} {len(values):8d} {len(values) / seconds:7.1f} "
              f"{percentile(values, 0.5) * 1000:7.1f} {percentile(values, 0.99) * 1000:7.1f}"
              f" {max(values) * 1000:7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
