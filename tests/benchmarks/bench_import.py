"""History import benchmark (run by hand, MariaDB + Redis, prints figures and ratios).

    .venv/bin/python tests/benchmarks/bench_import.py --rows 200000 --rounds 3
    .venv/bin/python tests/benchmarks/bench_import.py --rows 1000000

SPEC §14: a history import at the default settings ≥ 0.7× a plain bulk insert of the
same rows, measured in the same run, against the Procfile's processes.

1. Generates an export (gzip NDJSON): `rows / 50` slots (50 messages a slot),
   interleaved the way a time-sorted export interleaves them, robot/staff/counterpart
   messages, 30-minute+ gaps between conversations, 2% duplicated rows, 0.5% bad rows.
2. Plain: an `executemany` of `INSERT IGNORE` of the same rows (the file read and
   parsed, each row's time read, a row with a bad time skipped, duplicates refused by
   the unique key) into `plain_messages`, made `LIKE messages` — the same columns and
   indexes — in transactions of `--plain-batch` rows, on the bare driver (PyMySQL);
   then dropped.
3. The import end to end, at the SHIPPED defaults: the Procfile's `web` and `worker`
   lines run as they are (gunicorn sized by gunicorn.conf.py, the Celery worker with
   `--concurrency $(nproc)`), with no BATCH_SIZE, WEB_CONCURRENCY, WEB_THREADS or
   WORKER_CONCURRENCY in their environment and no `.env`; the file is uploaded over
   HTTP (`POST /api/v1/imports`) and the clock stops when the job is finished.
4. Runs plain, import, plain (the tables emptied in between) and takes the ratio of
   stored messages per second against the faster plain run; prints where the import's
   time and CPU went (phases; CPU seconds of web, workers and MariaDB), the peak RSS
   (VmHWM) of the web and worker processes, and how often the job was closed (once).
   `--rounds N` repeats the round on a fresh database and prints the median ratio:
   on a shared machine one round's ratio moves by ±0.1.

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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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


PLAIN_TABLE = "plain_messages"
PLAIN_COLUMNS = ("message_id", "session_pk", "account_id", "shop_id", "sender_role",
                 "sender_id", "content", "message_type", "sent_at", "received_at",
                 "import_job_id")


def plain_insert(url: str, path: Path, batch: int) -> tuple[float, int, dict[str, float]]:
    """The plain bulk insert: read and parse the file, executemany INSERT IGNORE of its
    rows into a table with the messages table's columns and indexes, `batch` rows a
    transaction; answer (seconds, rows stored, CPU seconds of this process and MariaDB).

    Rows get what any insert of them needs: a time read from the text (a bad one is
    skipped), a session key per slot (so the (session_pk, sent_at) index works as hard
    as in the import), a job id."""
    import pymysql

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {PLAIN_TABLE}")
        conn.exec_driver_sql(f"CREATE TABLE {PLAIN_TABLE} LIKE messages")
    parsed = sa.engine.make_url(url)
    db = pymysql.connect(host=parsed.host or "127.0.0.1", port=parsed.port or 3306,
                         user=parsed.username or "root", password=parsed.password or "",
                         database=parsed.database, charset="utf8mb4", autocommit=False)
    statement = (f"INSERT IGNORE INTO {PLAIN_TABLE} ({', '.join(PLAIN_COLUMNS)}) "
                 f"VALUES ({', '.join(['%s'] * len(PLAIN_COLUMNS))})")
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
    job_id = "imp_plain_benchmark"
    sessions: dict[tuple[str, str], int] = {}
    mariadb = database_pid()
    cpu_before = time.process_time(), cpu_seconds(mariadb)
    started = time.perf_counter()
    values: list[tuple[object, ...]] = []
    with db.cursor() as cursor, gzip.open(path, "rt", encoding="utf-8") as src:
        for line in src:
            row = json.loads(line)
            try:
                sent_at = datetime.fromisoformat(row["sent_at"]).astimezone(UTC)
            except (KeyError, TypeError, ValueError):
                continue
            slot = (row["account_id"], row["shop_id"])
            session_pk = sessions.setdefault(slot, len(sessions) + 1)
            values.append((row["message_id"], session_pk, slot[0], slot[1],
                           row["sender_role"], row.get("sender_id"), row["content"], "text",
                           sent_at.replace(tzinfo=None).isoformat(" ", "microseconds"), now,
                           job_id))
            if len(values) >= batch:
                cursor.executemany(statement, values)
                db.commit()
                values = []
        if values:
            cursor.executemany(statement, values)
            db.commit()
        elapsed = time.perf_counter() - started
        cpu = {"python": time.process_time() - cpu_before[0],
               "mariadb": cpu_seconds(mariadb) - cpu_before[1]}
        cursor.execute(f"SELECT COUNT(*) FROM {PLAIN_TABLE}")
        stored = int(cursor.fetchone()[0])
        cursor.execute(f"DROP TABLE {PLAIN_TABLE}")
    db.close()
    engine.dispose()
    return elapsed, stored, cpu


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


# Tuning variables the benchmark must not set: the import runs at the shipped defaults.
TUNING = ("BATCH_SIZE", "WEB_CONCURRENCY", "WEB_THREADS", "WORKER_CONCURRENCY",
          "SESSION_GAP", "MAX_UPLOAD_BYTES", "MAX_UPLOAD_EXPANDED_BYTES")


def procfile_command(name: str) -> str:
    """The command of a Procfile process, as the Procfile has it."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        key, _, command = line.partition(":")
        if key.strip() == name:
            return command.strip()
    raise SystemExit(f"Procfile has no {name!r} process")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def run_import(url: str, path: Path) -> dict[str, Any]:
    """Upload `path` to the Procfile's web process and wait for the Procfile's worker to
    finish the job; both run at the shipped defaults (no tuning variable, no .env)."""
    if (ROOT / ".env").exists():
        raise SystemExit(".env exists: the benchmark runs at the shipped defaults only")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_", "REDIS_")) and k not in TUNING}
    env.update(DATABASE_URL=url, REDIS_URL=REDIS_URL, REDIS_KEY_PREFIX="as-bench",
               PORT=str(PORT), PYTHONPATH=str(ROOT),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    token = json.loads(subprocess.run(
        [str(BIN / "auto-session"), "clients", "create", "--name", "bench", "--role", "admin",
         "--json"], env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    )["token"]
    logs = Path(tempfile.mkdtemp(prefix="bench-import-"))
    commands = {name: procfile_command(name) for name in ("web", "worker")}
    print("Procfile:", commands, f"(logs in {logs})", flush=True)
    procs = {name: subprocess.Popen(
        ["bash", "-c", f"exec {command}"], env=env, cwd=ROOT,
        stdout=(logs / f"{name}.log").open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True) for name, command in commands.items()}
    web, worker = procs["web"], procs["worker"]
    try:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=600) as http:
            def web_up() -> bool:
                try:
                    return http.get("/healthz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(web_up, 60, "the web process")
            wait_for(lambda: b" ready." in (logs / "worker.log").read_bytes(), 60,
                     "the worker")
            time.sleep(2)  # the worker's resume check on start finds nothing
            trees = {"web": process_tree(web.pid), "workers": process_tree(worker.pid),
                     "mariadb": database_pid()}
            print(f"processes: web {len(trees['web'])} (master + workers), worker "
                  f"{len(trees['workers'])} (main + children)", flush=True)
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
                time.sleep(0.1)
            elapsed = time.perf_counter() - started
        cpu = {name: cpu_seconds(pids) - cpu_before[name] for name, pids in trees.items()}
        web_peak = peak_rss_mb(web.pid)
        worker_peak = peak_rss_mb(worker.pid)
    finally:
        for proc in procs.values():
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    log = (logs / "worker.log").read_text(errors="replace")
    return {"elapsed": elapsed, "upload": uploaded, "job": job, "web": web_peak,
            "worker": worker_peak, "cpu": cpu, "phases": phases(url, job_id),
            "chunk_tasks": log.count("Task imports.chunk[") // 2,  # received + succeeded
            "closes": log.count(f"import {job_id} finished:"),
            "finish_tasks": log.count("Task imports.finish[") // 2}


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
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--per-slot", type=int, default=50, help="messages a slot")
    parser.add_argument("--plain-batch", type=int, default=5_000,
                        help="rows a transaction of the plain insert")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of plain, import, plain (the median ratio is the figure)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from app.config import Settings

    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    print(f"shipped defaults: BATCH_SIZE={defaults.batch_size}, "
          f"SESSION_GAP={defaults.session_gap}; cores {os.cpu_count()}", flush=True)
    slots = max(1, args.rows // args.per_slot)
    path = Path(tempfile.gettempdir()) / f"bench-import-{args.rows}-{slots}.ndjson.gz"
    stats = generate(path, args.rows, slots)
    print(f"export: {stats}, {slots} slots ({path.stat().st_size / 1e6:.1f} MB gzip)",
          flush=True)
    print("MariaDB:", server_settings(), flush=True)
    ratios = []
    for round_number in range(1, args.rounds + 1):
        print(f"-- round {round_number}", flush=True)
        ratios.append(one_round(path, stats, args.plain_batch))
    if len(ratios) > 1:
        print(f"RATIOS by round: {[round(r, 2) for r in ratios]}; median "
              f"{statistics.median(ratios):.2f}")


def one_round(path: Path, stats: dict[str, int], plain_batch: int) -> float:
    """Plain, import, plain on a fresh database; the ratio against the faster plain."""
    url = fresh_database()
    # plain, import, plain: on a shared 2-core machine one sample can be 40% off; the
    # ratio is taken against the faster plain run (the conservative one).
    rates = [measure_plain(url, path, plain_batch, "before the import")]
    result = run_import(url, path)
    job = result["job"]
    stored = stored_messages(url)
    empty_tables(url)
    rates.append(measure_plain(url, path, plain_batch, "after the import"))
    stored_rate = job["inserted"] / result["elapsed"]
    print(f"import: {job['status']} total={job['total_rows']} inserted={job['inserted']} "
          f"duplicates={job['duplicates']} invalid={job['invalid']} "
          f"sessions={job['sessions_created']} chunks={job['chunks']} "
          f"(chunk tasks run: {result['chunk_tasks']}; job closed {result['closes']}x; "
          f"finish tasks: {result['finish_tasks']})")
    print(f"import upload → job finished: {result['elapsed']:.1f}s (upload "
          f"{result['upload']:.1f}s) = {stats['rows'] / result['elapsed']:,.0f} rows/s, "
          f"{stored_rate:,.0f} stored messages/s")
    ratio = stored_rate / max(rates)
    print(f"RATIO import/plain (stored messages per second): {ratio:.2f} against the "
          f"faster plain run ({stored_rate / min(rates):.2f} against the slower)")
    print("import phases:", result["phases"])
    print("import CPU s:", {k: round(v, 1) for k, v in result["cpu"].items()})
    print("peak RSS MiB web:", {k: round(v) for k, v in result["web"].items()},
          "worker:", {k: round(v) for k, v in result["worker"].items()}, flush=True)
    assert job["inserted"] == stats["valid"] == stored, "every valid row stored, once"
    assert job["duplicates"] == stats["duplicates"] and job["invalid"] == stats["bad"]
    assert result["closes"] == 1, "the job closes once"
    return ratio


def measure_plain(url: str, path: Path, batch: int, when: str) -> float:
    seconds, rows, cpu = plain_insert(url, path, batch)
    print(f"plain executemany INSERT IGNORE ({when}): {rows} rows in {seconds:.1f}s = "
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
