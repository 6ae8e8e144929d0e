"""History import benchmark (run by hand, MariaDB + Redis, prints figures and ratios).

    .venv/bin/python tests/benchmarks/bench_import.py --rows 1000000
    .venv/bin/python tests/benchmarks/bench_import.py --rows 250000

1. Generates a realistic export (gzip NDJSON): `--slots` slots interleaved the way a
   time-sorted export interleaves them, robot/staff/counterpart messages, 30-minute+
   gaps between conversations, 2% duplicated rows, 0.5% bad rows.
2. Baseline: a plain bulk insert of the same valid rows into the same `messages`
   table (one process: read the file, parse, SQLAlchemy Core executemany in batches
   of `--batch-size`), with the import's row shape (each slot's rows on a session of
   their own, a job id), then emptied. It runs before and again after the import (on
   emptied tables); the ratio is taken against the faster of the two.
3. The import end to end: gunicorn (1 worker) receives the upload over HTTP, one
   Celery worker with `--workers` child processes runs prepare → chunks → finish;
   the clock stops when the job is finished.
4. Prints the MariaDB settings that bound both, messages/s of both, the ratio, where
   the import's time and CPU went (phases; CPU seconds of web, workers and MariaDB),
   and the peak RSS (VmHWM) of the web and worker processes.

Uses its own database (`auto_session_bench[_$TEST_DB_SUFFIX]`) and Redis db 2 (or
$TEST_REDIS_URL) with prefix `as-bench`; $BENCH_PORT moves the web server's port.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import redis
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVER = "mysql+pymysql://root@127.0.0.1:3306/"
# TEST_DB_SUFFIX / TEST_REDIS_URL keep concurrent runs apart, as for the tests.
DB = "auto_session_bench" + (f"_{os.environ['TEST_DB_SUFFIX']}"
                             if os.environ.get("TEST_DB_SUFFIX") else "")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/2")
PORT = int(os.environ.get("BENCH_PORT", "18321"))


def generate(path: Path, rows: int, slots: int, seed: int = 7) -> dict[str, int]:
    """Write the export; answer how many valid, duplicate and bad rows it holds."""
    rnd = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    per_slot = max(1, rows // slots)
    clocks = [start + timedelta(minutes=rnd.randint(0, 60 * 24 * 30)) for _ in range(slots)]
    stats = {"rows": 0, "valid": 0, "duplicates": 0, "bad": 0}
    recent: list[str] = []
    seq = 0
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=3) as out:
        for turn in range(per_slot):
            for slot in range(slots):
                if stats["rows"] >= rows:
                    break
                roll = rnd.random()
                if roll < 0.02 and recent:
                    out.write(rnd.choice(recent))
                    stats["duplicates"] += 1
                    stats["rows"] += 1
                    continue
                if roll < 0.025:
                    out.write(json.dumps({"account_id": "acc", "shop_id": f"shop-{slot}",
                                          "sender_role": "robot", "content": "bad",
                                          "sent_at": "not a time"}) + "\n")
                    stats["bad"] += 1
                    stats["rows"] += 1
                    continue
                gap = rnd.random()
                clocks[slot] += timedelta(minutes=rnd.randint(31, 600)) if (
                    turn % 8 == 0 and gap < 0.9) else timedelta(seconds=rnd.randint(5, 300))
                phase = turn % 8
                role = ("counterpart" if phase in (0, 2, 4, 6) else
                        "robot" if phase in (1, 3) else "human" if rnd.random() < 0.5
                        else "robot")
                seq += 1
                line = json.dumps({
                    "message_id": f"m{seq}", "account_id": f"acc-{slot % 50}",
                    "shop_id": f"shop-{slot}", "sender_role": role,
                    "sender_id": f"{role}-{slot % 7}",
                    "content": f"message {seq} from {role}: " + "x" * rnd.randint(10, 120),
                    "sent_at": clocks[slot].isoformat(),
                }, ensure_ascii=False) + "\n"
                out.write(line)
                stats["valid"] += 1
                stats["rows"] += 1
                if len(recent) < 1000:
                    recent.append(line)
                elif rnd.random() < 0.01:
                    recent[rnd.randrange(1000)] = line
    return stats


def fresh_database() -> str:
    engine = sa.create_engine(SERVER)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{DB}`")
        conn.exec_driver_sql(f"CREATE DATABASE `{DB}` CHARACTER SET utf8mb4")
    engine.dispose()
    url = f"{SERVER}{DB}"
    from app import migrate

    migrate.upgrade(url)
    redis.Redis.from_url(REDIS_URL).flushdb()
    return url


def baseline(url: str, path: Path, batch: int) -> tuple[float, int, dict[str, float]]:
    """Plain bulk insert of the valid rows into `messages` (file read + parse + insert,
    SQLAlchemy Core executemany, one transaction per `batch` rows), then emptied.

    The rows have the import's shape: each slot's messages point to a session of that
    slot (created before the clock starts) and carry a job id, so the foreign-key
    checks and the (session_pk, sent_at) index work as hard as in the import; one
    session for every row would make the baseline cheaper than any import can be."""
    from app.db import make_engine
    from app.ids import new_id
    from app.messages.models import Message
    from app.sessions.models import Session

    engine = make_engine(url)
    now = datetime.now(UTC)
    slots: set[tuple[str, str]] = set()
    with gzip.open(path, "rt", encoding="utf-8") as src:
        for line in src:
            row = json.loads(line)
            slots.add((row["account_id"], row["shop_id"]))
    with engine.begin() as conn:
        conn.execute(sa.insert(Session), [{
            "session_id": new_id("ses"), "account_id": account, "shop_id": shop,
            "session_type": "AUTO_BARGAIN", "task_type": "negotiation", "priority": 3,
            "status": "COMPLETED", "origin": "import", "created_at": now, "requested_at": now,
            "last_activity_at": now, "message_count": 0, "robot_message_count": 0,
            "human_message_count": 0, "counterpart_message_count": 0, "unanswered": False}
            for account, shop in sorted(slots)])
        session_pks = {(a, s): pk for pk, a, s in conn.execute(
            sa.select(Session.id, Session.account_id, Session.shop_id))}
    job_id = new_id("imp")
    mariadb = database_pid()
    cpu_before = time.process_time(), cpu_seconds(mariadb)
    started = time.perf_counter()
    inserted = 0
    seen: set[str] = set()
    values = []
    with gzip.open(path, "rt", encoding="utf-8") as src:
        for line in src:
            row = json.loads(line)
            mid = row.get("message_id")
            if not mid or mid in seen:
                continue
            seen.add(mid)
            values.append({
                "message_id": mid, "session_pk": session_pks[row["account_id"], row["shop_id"]],
                "account_id": row["account_id"], "shop_id": row["shop_id"],
                "sender_role": row["sender_role"], "sender_id": row["sender_id"],
                "content": row["content"], "message_type": "text",
                "sent_at": datetime.fromisoformat(row["sent_at"]), "received_at": now,
                "import_job_id": job_id,
            })
            if len(values) >= batch:
                with engine.begin() as conn:
                    conn.execute(sa.insert(Message), values)
                inserted += len(values)
                values = []
    if values:
        with engine.begin() as conn:
            conn.execute(sa.insert(Message), values)
        inserted += len(values)
    elapsed = time.perf_counter() - started
    cpu = {"python": time.process_time() - cpu_before[0],
           "mariadb": cpu_seconds(mariadb) - cpu_before[1]}
    engine.dispose()
    empty_tables(url)
    return elapsed, inserted, cpu


def empty_tables(url: str) -> None:
    """Give the next measurement the same empty tables the first one started from."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS=0")
        for table in ("messages", "session_operations", "session_transfers", "sessions"):
            conn.exec_driver_sql(f"TRUNCATE TABLE {table}")
        conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS=1")
    engine.dispose()


def server_settings() -> dict[str, str]:
    """The MariaDB settings that bound a bulk insert (read, never changed)."""
    engine = sa.create_engine(SERVER)
    names = ["version", "innodb_buffer_pool_size", "innodb_flush_log_at_trx_commit",
             "innodb_log_file_size", "innodb_autoinc_lock_mode", "sync_binlog", "log_bin",
             "max_allowed_packet"]
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT " + ", ".join(f"@@{n}" for n in names)).one()
    engine.dispose()
    return {n: str(v) for n, v in zip(names, row, strict=True)}


def process_tree(root_pid: int) -> list[int]:
    """A process and its direct children (gunicorn's worker, Celery's pool)."""
    pids = [root_pid]
    try:
        children = Path(f"/proc/{root_pid}/task/{root_pid}/children").read_text().split()
        pids += [int(p) for p in children]
    except OSError:
        pass
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of live processes (where the run's CPU went)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def database_pid() -> list[int]:
    """mariadbd's pid, from its pid file (empty if the server is elsewhere)."""
    engine = sa.create_engine(SERVER)
    with engine.connect() as conn:
        pid_file = conn.exec_driver_sql("SELECT @@pid_file").scalar_one()
    engine.dispose()
    try:
        return [int(Path(pid_file).read_text().split()[0])]
    except (OSError, ValueError, IndexError):
        return []


def peak_rss_mb(root_pid: int) -> dict[int, float]:
    """VmHWM (peak resident set) of a process and its children, in MiB."""
    peaks = {}
    for pid in process_tree(root_pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks[pid] = int(line.split()[1]) / 1024
        except OSError:
            continue
    return peaks


def run_import(url: str, path: Path, workers: int, batch: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_"))}
    env.update(DATABASE_URL=url, REDIS_URL=REDIS_URL, REDIS_KEY_PREFIX="as-bench",
               BATCH_SIZE=str(batch), PYTHONPATH=str(ROOT))
    token = json.loads(subprocess.run(
        [str(BIN / "auto-session"), "clients", "create", "--name", "bench", "--role", "admin",
         "--json"], env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    )["token"]
    logs = Path(tempfile.mkdtemp(prefix="bench-import-"))
    web = subprocess.Popen(
        [str(BIN / "gunicorn"), "--workers", "1", "--threads", "4", "--bind",
         f"127.0.0.1:{PORT}", "--timeout", "600", "app.wsgi:app"],
        env=env, cwd=ROOT, stdout=(logs / "web.log").open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    worker = subprocess.Popen(
        [str(BIN / "celery"), "-A", "tasks.celery_app:celery", "worker", "--loglevel",
         "WARNING", "--concurrency", str(workers), "--pool", "prefork", "-n",
         "bench@127.0.0.1", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        env=env, cwd=ROOT, stdout=(logs / "worker.log").open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=600) as http:
            for _ in range(100):
                try:
                    if http.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            time.sleep(3)  # the worker is up (its resume check finds nothing)
            trees = {"web": process_tree(web.pid), "workers": process_tree(worker.pid),
                     "mariadb": database_pid()}
            cpu_before = {name: cpu_seconds(pids) for name, pids in trees.items()}
            started = time.perf_counter()
            with path.open("rb") as body:
                response = http.post("/api/v1/imports?format=ndjson", content=body,
                                     headers={**headers, "Content-Type": "application/gzip"})
            response.raise_for_status()
            job_id = response.json()["job_id"]
            uploaded = time.perf_counter() - started
            while True:
                job = http.get(f"/api/v1/imports/{job_id}", headers=headers).json()
                if job["status"] in ("succeeded", "partially_succeeded", "failed"):
                    break
                time.sleep(0.25)
            elapsed = time.perf_counter() - started
        cpu = {name: cpu_seconds(pids) - cpu_before[name] for name, pids in trees.items()}
        web_peak = peak_rss_mb(web.pid)
        worker_peak = peak_rss_mb(worker.pid)
    finally:
        for proc in (web, worker):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return {"elapsed": elapsed, "upload": uploaded, "job": job, "web": web_peak,
            "worker": worker_peak, "cpu": cpu, "phases": phases(url, job_id)}


def phases(url: str, job_id: str) -> str:
    """When the split ended (about: the first chunk's commit) and the chunks ran."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        created, started, finished, first, last = conn.exec_driver_sql(
            "SELECT j.created_at, j.started_at, j.finished_at, MIN(c.done_at), MAX(c.done_at) "
            "FROM import_jobs j JOIN import_chunks c ON c.job_pk = j.id WHERE j.job_id = %s "
            "GROUP BY j.id", (job_id,)).one()
    engine.dispose()
    def seconds(a: datetime, b: datetime) -> str:
        return f"{(b - a).total_seconds():.1f}s"

    return (f"upload {seconds(created, started)}, split + first chunk {seconds(started, first)}"
            f", other chunks {seconds(first, last)}, finish {seconds(last, finished)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--slots", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    path = Path(tempfile.gettempdir()) / f"bench-import-{args.rows}.ndjson.gz"
    stats = generate(path, args.rows, args.slots)
    print(f"export: {stats} ({path.stat().st_size / 1e6:.1f} MB gzip)", flush=True)
    print("MariaDB:", server_settings(), flush=True)
    url = fresh_database()
    # The import is bracketed by two baselines: on a shared 2-core machine one sample can
    # be 40% off; the ratio is taken against the faster of the two (the conservative one).
    rates = [measure_baseline(url, path, args.batch_size, "before the import")]
    result = run_import(url, path, args.workers, args.batch_size)
    job = result["job"]
    stored = stored_messages(url)
    empty_tables(url)
    rates.append(measure_baseline(url, path, args.batch_size, "after the import"))
    rate = stats["rows"] / result["elapsed"]
    stored_rate = job["inserted"] / result["elapsed"]
    print(f"import: {job['status']} total={job['total_rows']} inserted={job['inserted']} "
          f"duplicates={job['duplicates']} invalid={job['invalid']} "
          f"sessions={job['sessions_created']}")
    print(f"import end to end: {result['elapsed']:.1f}s (upload {result['upload']:.1f}s) = "
          f"{rate:,.0f} rows/s, {stored_rate:,.0f} stored messages/s")
    print(f"ratio import/baseline (stored messages per second): "
          f"{stored_rate / max(rates):.2f} against the faster baseline "
          f"({stored_rate / min(rates):.2f} against the slower)")
    print("import phases:", result["phases"])
    print("import CPU s:", {k: round(v, 1) for k, v in result["cpu"].items()})
    print("peak RSS MiB web:", {k: round(v) for k, v in result["web"].items()},
          "worker:", {k: round(v) for k, v in result["worker"].items()})
    assert job["inserted"] == stats["valid"] == stored, "every valid row stored, once"


def measure_baseline(url: str, path: Path, batch: int, when: str) -> float:
    seconds, rows, cpu = baseline(url, path, batch)
    print(f"baseline bulk insert ({when}): {rows} rows in {seconds:.1f}s = "
          f"{rows / seconds:,.0f} rows/s; CPU s:", {k: round(v, 1) for k, v in cpu.items()},
          flush=True)
    return rows / seconds


def stored_messages(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        count = conn.exec_driver_sql("SELECT COUNT(*) FROM messages").scalar_one()
    engine.dispose()
    return int(count)


if __name__ == "__main__":
    main()
