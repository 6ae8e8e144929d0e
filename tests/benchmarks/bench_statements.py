"""MariaDB's own CPU for the hot paths' kinds of statement (run by hand, never by pytest).

    .venv/bin/python -m tests.benchmarks.bench_statements [--sessions 2000] [--rounds 2] \
        [--flush-log-2]

Why: a GET, a heartbeat and a live message each spend 190–650 µs a request in mariadbd
(`bench_hotpaths`, "mariadb"), 15–30% of their server CPU; this says what that is made of,
so that nobody has to guess which SQL change could lower it. Each variant below is sent
by bare PyMySQL, one statement a round trip (autocommit), once for every session of a
scratch database (`auto_session_bench_statements`, migrated, its sessions written by
SQL in the shape the app writes them, dropped at the end); the CPU of the mariadbd thread
serving this connection (`/proc/<pid>/task/<tid>`, the thread found through
`information_schema.PROCESSLIST.TID`) and of the whole mariadbd process is read before
and after, and printed per statement, with the ratio to `SELECT 1` of the same round.

`--flush-log-2` also runs the writes with `innodb_flush_log_at_trx_commit=2` (SET GLOBAL,
restored at exit): what the commit's redo-log flush costs. It is not a setting we ship
or measure the aims with (SPEC §14: MariaDB's default settings).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from typing import Any

import pymysql
from pymysql.constants import CLIENT

from tests.benchmarks.bench_hotpaths import admin_sql, prepare_database, server_params

DB_NAME = "auto_session_bench_statements"
TICK = os.sysconf("SC_CLK_TCK")

# The columns of the session view (the GET's and the heartbeat's answer), as the app reads
# them: `app.sessions.models.VIEW_COLUMNS` — taken from there, so this stays the app's row.
def view_columns() -> list[str]:
    from app.sessions.models import VIEW_COLUMNS

    return [column.name for column in VIEW_COLUMNS]


def variants(columns: list[str]) -> list[tuple[str, str, bool]]:
    """(label, SQL with {pk} {sid} {now} {deadline}, writes)."""
    row = ", ".join(columns)
    as_json = "JSON_OBJECT(" + ", ".join(f"'{c}', {c}" for c in columns) + ")"
    return [
        ("SELECT 1", "SELECT 1", False),
        (f"the view row by session_id ({len(columns)} columns)",
         f"SELECT {row} FROM sessions WHERE session_id = '{{sid}}'", False),
        ("5 columns by session_id",
         "SELECT id, session_id, status, client_id, deadline_at FROM sessions "
         "WHERE session_id = '{sid}'", False),
        ("the id by session_id", "SELECT id FROM sessions WHERE session_id = '{sid}'", False),
        ("the view row as one JSON_OBJECT column",
         f"SELECT {as_json} FROM sessions WHERE session_id = '{{sid}}'", False),
        ("UPDATE last_activity_at by id",
         "UPDATE sessions SET last_activity_at = '{now}' WHERE id = {pk}", True),
        ("UPDATE last_activity_at, deadline_at (indexed) by id",
         "UPDATE sessions SET last_activity_at = '{now}', deadline_at = '{deadline}' "
         "WHERE id = {pk}", True),
        ("UPDATE + the view row, one query (a heartbeat's shape)",
         "UPDATE sessions SET last_activity_at = '{now}', deadline_at = '{deadline}' "
         f"WHERE session_id = '{{sid}}'; SELECT {row} FROM sessions "
         "WHERE session_id = '{sid}'", True),
    ]


def seed(conn: pymysql.Connection, count: int) -> list[tuple[int, str]]:
    """`count` ACTIVE robot sessions with the values a create writes (each on its slot)."""
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO sessions (session_id, account_id, shop_id, session_type, task_type,"
            " priority, status, holds_slot, owner_id, client_id, origin, created_at,"
            " requested_at, activated_at, last_activity_at, deadline_at, message_count,"
            " robot_message_count, human_message_count, counterpart_message_count,"
            " unanswered, audit_head)"
            " SELECT CONCAT('ses_', LPAD(seq, 20, 'x')), 'bench', CONCAT('shop-', seq),"
            " 'AUTO_BARGAIN', 'negotiation', 3, 'ACTIVE', 1, 'cli_benchstatements0000',"
            " 'cli_benchstatements0000', 'live', NOW(6), NOW(6), NOW(6), NOW(6),"
            " NOW(6) + INTERVAL 10 MINUTE, 0, 0, 0, 0, 0, SHA2(seq, 256)"
            f" FROM seq_1_to_{count}")
        cur.execute("SELECT id, session_id FROM sessions ORDER BY id")
        return [(int(pk), str(sid)) for pk, sid in cur.fetchall()]


def mariadbd_pid() -> int:
    return int(subprocess.check_output(["pgrep", "-x", "mariadbd"]).split()[0])


def ticks(path: str) -> tuple[int, int]:
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # utime, stime


def run(conn: pymysql.Connection, sql: str, rows: list[tuple[int, str]], shift: int,
        pid: int, tid: int) -> dict[str, float]:
    thread, process = f"/proc/{pid}/task/{tid}/stat", f"/proc/{pid}/stat"
    base = time.time() + 3600 + shift * len(rows)
    texts = []
    for n, (pk, sid) in enumerate(rows):
        now = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(base + n))
        deadline = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(base + n + 600))
        texts.append(sql.format(pk=pk, sid=sid, now=now, deadline=deadline))
    (tu, ts), (pu, ps) = ticks(thread), ticks(process)
    wall = time.perf_counter()
    with conn.cursor() as cur:
        for text in texts:
            cur.execute(text)
            while cur.nextset():
                pass
    wall = time.perf_counter() - wall
    (tu2, ts2), (pu2, ps2) = ticks(thread), ticks(process)
    per = 1e6 / TICK / len(rows)
    return {"user": (tu2 - tu) * per, "sys": (ts2 - ts) * per,
            "thread": (tu2 - tu + ts2 - ts) * per, "process": (pu2 - pu + ps2 - ps) * per,
            "wall": wall * 1e6 / len(rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--flush-log-2", action="store_true",
                        help="also run the writes with innodb_flush_log_at_trx_commit=2")
    args = parser.parse_args()

    url = prepare_database(DB_NAME)
    conn = pymysql.connect(**server_params(), database=DB_NAME, charset="utf8mb4",
                           autocommit=True, client_flag=CLIENT.MULTI_STATEMENTS)
    flush_before: Any = None
    try:
        rows = seed(conn, args.sessions)
        with conn.cursor() as cur:
            cur.execute("SELECT TID FROM information_schema.PROCESSLIST "
                        "WHERE ID = CONNECTION_ID()")
            tid = int(cur.fetchone()[0])
            cur.execute("SELECT @@GLOBAL.innodb_flush_log_at_trx_commit")
            flush_before = int(cur.fetchone()[0])
        pid = mariadbd_pid()
        plan = [(label, sql, writes, None) for label, sql, writes in variants(view_columns())]
        if args.flush_log_2:
            plan += [(label + ", flush_log_at_trx_commit=2", sql, True, 2)
                     for label, sql, writes in variants(view_columns()) if writes]
        print(f"{len(rows)} sessions, {url.rsplit('@', 1)[-1]}, rounds alternate the "
              f"variants; innodb_flush_log_at_trx_commit={flush_before}", flush=True)
        results: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in plan}
        shift = 0
        for _ in range(args.rounds):
            for label, sql, _writes, flush in plan:
                if flush is not None:
                    admin_sql(f"SET GLOBAL innodb_flush_log_at_trx_commit = {flush}")
                try:
                    results[label].append(run(conn, sql, rows, shift, pid, tid))
                finally:
                    if flush is not None:
                        admin_sql(f"SET GLOBAL innodb_flush_log_at_trx_commit = "
                                  f"{flush_before}")
                shift += 1
    finally:
        conn.close()
        if flush_before is not None:
            admin_sql(f"SET GLOBAL innodb_flush_log_at_trx_commit = {flush_before}")
        admin_sql(f"DROP DATABASE IF EXISTS `{DB_NAME}`")

    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in results[label])

    one = med("SELECT 1", "thread")
    print("\nmariadbd CPU per statement, µs (median of the rounds): the thread serving this "
          "connection (user + sys), the whole process, × SELECT 1 (thread); client wall")
    print(f"{'statement':62s} {'thread':>7s} {'user':>6s} {'sys':>6s} {'process':>8s} "
          f"{'×sel1':>6s} {'wall':>7s}")
    for label in results:
        print(f"{label[:62]:62s} {med(label, 'thread'):7.0f} {med(label, 'user'):6.0f} "
              f"{med(label, 'sys'):6.0f} {med(label, 'process'):8.0f} "
              f"{med(label, 'thread') / one:6.2f} {med(label, 'wall'):7.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
