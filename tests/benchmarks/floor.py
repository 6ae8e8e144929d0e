"""The floor of each hot path: its own SQL, replayed through the bare driver (run by hand).

Started by `tests/benchmarks/bench_hotpaths.py` (which prepares the database, the bots
and their sessions), in a process of its own with the server's settings in the
environment (`DATABASE_URL`, `REDIS_URL`, `REDIS_KEY_PREFIX`):

    python -m tests.benchmarks.floor --input FLOOR_IN.json --output FLOOR_OUT.json

Which statements are replayed: exactly those the product issues, recorded rather than
written down by hand, so that the floor follows the code as it changes —

1. the bench database is cloned (every table, rows and AUTO_INCREMENT counters) into a
   replay database;
2. the app (`app.factory.create_app()`, the code gunicorn serves) answers, in this
   process through Flask's test client, `--requests` requests of each hot path on
   sessions reserved for the floor (GET /api/v1/sessions/{id}, POST …/heartbeat, POST
   …/messages with one message, POST /api/v1/sessions on a free slot), after one
   warm-up request per bot token (auth cache, pool, dialect start-up);
   every call the app makes on PyMySQL — `Cursor.execute` / `executemany` with the
   statement text and parameters exactly as SQLAlchemy passed them, `Connection.commit`,
   `rollback`, `ping` (pool checkout pings, pool-return rollbacks) and `autocommit`
   (SQLAlchemy's AUTOCOMMIT isolation level), per connection —
   is recorded, and so is the number of Redis round trips (`send_packed_command`:
   rate-limit counter, slot lock, Celery publish…), which the floor does not replay;
3. the recording is replayed in the same order, single-threaded, on one PyMySQL
   connection per recorded connection, against the clone — which is in the state the
   bench database was in, so every UPDATE matches the same rows and every INSERT gets
   the same AUTO_INCREMENT id (the rowcount of every statement is compared with the
   recorded one; a mismatch or an error is reported, not hidden; past 20 errors the
   replay has diverged and the floor is reported void).

The CPU per operation (one recorded request's statements) is this process's
`time.process_time()` (the driver: building packets, parsing results) plus the CPU of
the mariadbd threads serving the replay connections (their `/proc/<mariadbd>/task/<tid>`
schedstat run time, the thread found by `information_schema.PROCESSLIST.TID`), per path;
the whole mariadbd process's CPU is reported beside it (it also counts InnoDB's
background threads and whatever else the server does for other users).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pymysql
import pymysql.connections
import pymysql.cursors

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PATHS = ("get", "heartbeat", "messages", "create")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- CPU of mariadbd (whole process, and chosen threads) -------------------------------
def pids_named(*names: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in names:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def stat_cpu(path: str) -> float:
    """utime + stime in seconds from a /proc/…/stat file (0 when it is gone)."""
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def mariadbd_pid() -> int:
    pids = pids_named("mariadbd", "mysqld")
    if not pids:
        raise SystemExit("no mariadbd process found in /proc (the database must be local)")
    return pids[0]


def thread_cpu(pid: int, tid: int) -> float:
    """CPU seconds of one thread: its schedstat run time (nanoseconds, so short
    measurements are not rounded to clock ticks), else its stat utime + stime."""
    try:
        return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        return stat_cpu(f"/proc/{pid}/task/{tid}/stat")


def threads_cpu(pid: int, tids: list[int]) -> float:
    return sum(thread_cpu(pid, tid) for tid in tids)


def all_threads_cpu(pid: int) -> float:
    """The whole process, as the sum of its threads' run times (threads that exit
    meanwhile are missed; mariadbd keeps its threads)."""
    try:
        return threads_cpu(pid, [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()])
    except OSError:
        return 0.0


# ---- cloning the bench database -------------------------------------------------------
def server_connection(server: dict[str, Any], database: str | None = None) -> Any:
    return pymysql.connect(host=server["host"], port=server["port"], user=server["user"],
                           password=server["password"], database=database,
                           charset="utf8mb4", autocommit=True)


def clone_database(server: dict[str, Any], source: str, target: str) -> None:
    """`target` := a copy of `source` (tables, rows, AUTO_INCREMENT counters)."""
    conn = server_connection(server)
    try:
        cur = conn.cursor()
        cur.execute(f"DROP DATABASE IF EXISTS `{target}`")
        cur.execute(f"CREATE DATABASE `{target}` CHARACTER SET utf8mb4")
        cur.execute("SET SESSION foreign_key_checks = 0")
        cur.execute("SELECT TABLE_NAME, AUTO_INCREMENT FROM information_schema.TABLES "
                    "WHERE TABLE_SCHEMA = %s AND TABLE_TYPE = 'BASE TABLE'", (source,))
        tables = cur.fetchall()
        for name, auto_increment in tables:
            cur.execute(f"CREATE TABLE `{target}`.`{name}` LIKE `{source}`.`{name}`")
            cur.execute("SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE "
                        "TABLE_SCHEMA = %s AND TABLE_NAME = %s AND IS_GENERATED = 'NEVER' "
                        "ORDER BY ORDINAL_POSITION", (source, name))
            columns = ", ".join(f"`{c}`" for (c,) in cur.fetchall())
            cur.execute(f"INSERT INTO `{target}`.`{name}` ({columns}) "
                        f"SELECT {columns} FROM `{source}`.`{name}`")
            if auto_increment:
                cur.execute(f"ALTER TABLE `{target}`.`{name}` AUTO_INCREMENT = "
                            f"{int(auto_increment)}")
    finally:
        conn.close()


def drop_database(server: dict[str, Any], name: str) -> None:
    conn = server_connection(server)
    try:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


# ---- recording what the app asks of PyMySQL and Redis ---------------------------------
class Recorder:
    """Patches PyMySQL's Connection and Cursor (and redis-py's send) for this process."""

    def __init__(self) -> None:
        self.ops: list[tuple[Any, ...]] | None = None  # None: not recording
        self.redis_calls = 0
        self.connect_kwargs: dict[int, dict[str, Any]] = {}
        self._depth = threading.local()
        self._keys = iter(range(1, 10**9))
        self._saved: list[tuple[type, str, Any]] = []

    def key_of(self, conn: Any) -> int:
        key = getattr(conn, "_floor_key", None)
        if key is None:
            key = next(self._keys)
            conn._floor_key = key
        return key

    def _patch(self, cls: type, name: str, wrapper: Any) -> None:
        self._saved.append((cls, name, cls.__dict__[name]))
        setattr(cls, name, wrapper)

    def install(self) -> None:
        rec = self
        conn_cls = pymysql.connections.Connection
        cur_cls = pymysql.cursors.Cursor
        orig_init = conn_cls.__init__
        orig_execute, orig_many = cur_cls.execute, cur_cls.executemany
        orig_commit, orig_rollback, orig_ping = conn_cls.commit, conn_cls.rollback, conn_cls.ping
        orig_autocommit, orig_begin = conn_cls.autocommit, conn_cls.begin
        orig_select_db = conn_cls.select_db

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            if args:
                raise RuntimeError("floor: PyMySQL connected with positional arguments")
            orig_init(self, **kwargs)
            rec.connect_kwargs[rec.key_of(self)] = dict(kwargs)

        def nested(fn: Any, kind: str) -> Any:
            def run(self: Any, query: Any, args: Any = None) -> Any:
                depth = getattr(rec._depth, "n", 0)
                rec._depth.n = depth + 1
                try:
                    result = fn(self, query, args)
                finally:
                    rec._depth.n = depth
                if depth == 0 and rec.ops is not None:
                    kept = list(args) if kind == "executemany" and args is not None else args
                    rec.ops.append((kind, rec.key_of(self.connection), query, kept, result))
                return result
            return run

        def simple(fn: Any, kind: str) -> Any:
            def run(self: Any, *args: Any, **kwargs: Any) -> Any:
                result = fn(self, *args, **kwargs)
                if rec.ops is not None:
                    rec.ops.append((kind, rec.key_of(self), *args))
                return result
            return run

        self._patch(conn_cls, "__init__", init)
        self._patch(cur_cls, "execute", nested(orig_execute, "execute"))
        self._patch(cur_cls, "executemany", nested(orig_many, "executemany"))
        self._patch(conn_cls, "commit", simple(orig_commit, "commit"))
        self._patch(conn_cls, "rollback", simple(orig_rollback, "rollback"))
        self._patch(conn_cls, "ping", simple(orig_ping, "ping"))
        # SQLAlchemy's AUTOCOMMIT isolation level is `Connection.autocommit(True)` (a SET
        # AUTOCOMMIT sent by PyMySQL itself, not through a cursor)
        self._patch(conn_cls, "autocommit", simple(orig_autocommit, "autocommit"))
        self._patch(conn_cls, "begin", simple(orig_begin, "begin"))
        self._patch(conn_cls, "select_db", simple(orig_select_db, "select_db"))

        import redis.connection

        for cls in redis.connection.Connection.__mro__:
            if "send_packed_command" in cls.__dict__:
                orig_send = cls.__dict__["send_packed_command"]

                def send(self: Any, *args: Any, _orig: Any = orig_send, **kwargs: Any) -> Any:
                    if rec.ops is not None:
                        rec.redis_calls += 1
                    return _orig(self, *args, **kwargs)

                self._patch(cls, "send_packed_command", send)
                break

    def uninstall(self) -> None:
        for cls, name, original in reversed(self._saved):
            setattr(cls, name, original)
        self._saved.clear()


def shape(query: str) -> str:
    """A statement's text without its literals, for the statement list (several
    statements written out with their values, `app.fastsql.in_one_query`: every quoted
    value and number is a literal)."""
    text = re.sub(r"\s+", " ", str(query)).strip()
    if not re.search(r"%\(\w+\)s|%s", text):
        text = re.sub(r"'(?:[^'\\]|\\.)*'|\b\d+(?:\.\d+)?\b|\bNULL\b", "?", text)
    text = re.sub(r"%\(\w+\)s|%s", "?", text)
    text = re.sub(r"\(\?(, \?)+\)", "(…)", text)
    return text


def describe(requests: list[list[tuple[Any, ...]]]) -> dict[str, Any]:
    kinds: collections.Counter[str] = collections.Counter()
    statements: collections.Counter[str] = collections.Counter()
    for ops in requests:
        for op in ops:
            kinds[op[0]] += 1
            if op[0] in ("execute", "executemany"):
                statements[shape(op[2])] += 1
    n = max(len(requests), 1)
    return {
        "per_request": {kind: round(count / n, 2) for kind, count in sorted(kinds.items())},
        "statements": [{"per_request": round(count / n, 2), "sql": sql}
                       for sql, count in statements.most_common()],
    }


# ---- capture ---------------------------------------------------------------------------
def capture(spec: dict[str, Any], recorder: Recorder) -> dict[str, Any]:
    from app.factory import create_app
    from app.runtime import get_runtime

    app = create_app()
    client = app.test_client()
    sessions = spec["sessions"]
    per_path = spec["requests"]
    tag = spec["tag"]
    warm_sessions = sessions[:len(spec["tokens"])]
    failures: collections.Counter[str] = collections.Counter()
    samples: dict[str, str] = {}

    def call(path: str, n: int, sid: str, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        if path == "get":
            response = client.get(f"/api/v1/sessions/{sid}", headers=headers)
        elif path == "heartbeat":
            response = client.post(f"/api/v1/sessions/{sid}/heartbeat", headers=headers)
        elif path == "messages":
            response = client.post(f"/api/v1/sessions/{sid}/messages", headers=headers, json={
                "messages": [{"message_id": f"floor-{tag}-{n}",
                              "content": "bench: is the price final?",
                              "sender_role": "robot"}]})
        else:
            response = client.post("/api/v1/sessions", headers=headers, json={
                "account_id": "bench-floor", "shop_id": f"floor-{tag}-{n}",
                "session_type": "AUTO_BARGAIN"})
        if not 200 <= response.status_code < 300:
            failures[f"{path} {response.status_code}"] += 1
            samples.setdefault(path, response.get_data(as_text=True)[:300])

    recorded: dict[str, list[list[tuple[Any, ...]]]] = {}
    redis_calls: dict[str, float] = {}
    recorder.ops = []
    for sid, token in warm_sessions:  # one per token: auth cache, pool, dialect start-up
        call("get", 0, sid, token)
    recorded["warm"] = [recorder.ops]
    body_sessions = sessions[len(warm_sessions):]
    if len(body_sessions) < per_path:
        raise SystemExit(f"floor: {len(body_sessions)} sessions for {per_path} requests")
    for path in PATHS:
        recorder.redis_calls = 0
        runs = []
        for n in range(per_path):
            sid, token = body_sessions[n]
            recorder.ops = []
            call(path, n, sid, token)
            runs.append(recorder.ops)
        recorded[path] = runs
        redis_calls[path] = recorder.redis_calls / per_path
    recorder.ops = None
    get_runtime().close()
    return {"recorded": recorded, "redis_calls": redis_calls, "failures": dict(failures),
            "samples": samples}


# ---- replay ----------------------------------------------------------------------------
MAX_REPLAY_ERRORS = 20


class ReplayDiverged(RuntimeError):
    """The replay stopped matching the recording (errors piled up): the floor is void."""


class Replayer:
    def __init__(self, recorder: Recorder, database: str, mariadbd: int) -> None:
        self.recorder = recorder
        self.database = database
        self.mariadbd = mariadbd
        self.conns: dict[int, Any] = {}
        self.tids: list[int] = []
        self.mismatches = 0
        self.errors: collections.Counter[str] = collections.Counter()

    def conn(self, key: int) -> Any:
        conn = self.conns.get(key)
        if conn is None:
            kwargs = dict(self.recorder.connect_kwargs.get(key) or {})
            if not kwargs:
                raise SystemExit(f"floor: connection {key} was opened before the recording")
            kwargs.pop("db", None)
            kwargs["database"] = self.database
            conn = pymysql.connect(**kwargs)
            cur = conn.cursor()
            # a replay that diverged from the recording fails fast instead of waiting
            cur.execute("SET SESSION innodb_lock_wait_timeout = 2")
            cur.execute("SELECT TID FROM information_schema.PROCESSLIST WHERE ID = "
                        "CONNECTION_ID()")
            self.tids.append(int(cur.fetchone()[0]))
            cur.close()
            self.conns[key] = conn
        return conn

    def run(self, ops: list[tuple[Any, ...]]) -> None:
        for op in ops:
            kind, key = op[0], op[1]
            conn = self.conn(key)
            try:
                if kind in ("execute", "executemany"):
                    cur = conn.cursor()
                    if kind == "execute":
                        rows = cur.execute(op[2], op[3])
                    else:
                        rows = cur.executemany(op[2], op[3])
                    cur.fetchall()
                    cur.close()
                    if rows != op[4]:
                        self.mismatches += 1
                elif kind == "commit":
                    conn.commit()
                elif kind == "rollback":
                    conn.rollback()
                elif kind == "autocommit":
                    conn.autocommit(*op[2:])
                elif kind == "begin":
                    conn.begin()
                elif kind == "select_db":
                    pass  # the replay connection stays on the clone
                else:
                    conn.ping(reconnect=False)
            except pymysql.MySQLError as exc:
                self.errors[f"{exc.__class__.__name__} {exc.args[0] if exc.args else ''}"] += 1
                if sum(self.errors.values()) > MAX_REPLAY_ERRORS:
                    raise ReplayDiverged(dict(self.errors)) from exc

    def close(self) -> None:
        for conn in self.conns.values():
            with contextlib.suppress(pymysql.MySQLError):
                conn.close()


def replay(recorder: Recorder, captured: dict[str, Any], database: str) -> dict[str, Any]:
    pid = mariadbd_pid()
    replayer = Replayer(recorder, database, pid)
    try:
        replayer.run(captured["recorded"]["warm"][0])
        results: dict[str, Any] = {}
        for path in PATHS:
            runs = captured["recorded"][path]
            for ops in runs:  # connections opened outside the timing
                for op in ops:
                    replayer.conn(op[1])
            mismatches, errors = replayer.mismatches, sum(replayer.errors.values())
            cpu0, db0, dbt0 = time.process_time(), all_threads_cpu(pid), \
                threads_cpu(pid, replayer.tids)
            wall0 = time.perf_counter()
            for ops in runs:
                replayer.run(ops)
            wall = time.perf_counter() - wall0
            cpu = time.process_time() - cpu0
            db = all_threads_cpu(pid) - db0
            dbt = threads_cpu(pid, replayer.tids) - dbt0
            n = len(runs)
            results[path] = {
                "requests": n,
                "driver_us": cpu / n * 1e6,
                "mariadbd_threads_us": dbt / n * 1e6,
                "mariadbd_process_us": db / n * 1e6,
                "floor_us": (cpu + dbt) / n * 1e6,
                "wall_us": wall / n * 1e6,
                "rowcount_mismatches": replayer.mismatches - mismatches,
                "errors": sum(replayer.errors.values()) - errors,
                "redis_round_trips_per_request": round(captured["redis_calls"][path], 2),
                **describe(runs),
            }
        results["_errors"] = dict(replayer.errors)
        return results
    finally:
        replayer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--input", required=True, help="JSON written by bench_hotpaths")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    spec = json.loads(Path(args.input).read_text())
    server = spec["server"]
    clone_database(server, spec["source_db"], spec["replay_db"])
    recorder = Recorder()
    recorder.install()
    try:
        captured = capture(spec, recorder)
        try:
            results = replay(recorder, captured, spec["replay_db"])
        except ReplayDiverged as exc:
            results = {"_diverged": str(exc)}
    finally:
        recorder.uninstall()
        drop_database(server, spec["replay_db"])
    results["_capture_failures"] = captured["failures"]
    results["_capture_samples"] = captured["samples"]
    Path(args.output).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
