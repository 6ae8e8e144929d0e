"""Hot paths of the shipped `web` process, driven by wrk (run by hand, never by pytest).

    .venv/bin/python -m tests.benchmarks.bench_hotpaths [--rounds 3] [--duration 5] \
        [--connections 4,16] [--json PATH] [--compare CHECKOUT]

What it measures (SPEC §14): the product, not the load generator.

- **The server as shipped.** The Procfile's `web` line is run as it stands (`sh -c
  "exec <line>"` in the repository, so `gunicorn.conf.py` sizes it from the cores), with
  no tuning variable in its environment (every setting of `app.config.Settings` and
  WEB_CONCURRENCY / WEB_THREADS / GUNICORN_CMD_ARGS removed) — only `DATABASE_URL` (a
  scratch MariaDB database, created, migrated with `app.migrate.upgrade` and dropped by
  this script), `REDIS_URL` (db 10, flushed before and after), a `REDIS_KEY_PREFIX` of
  its own and `PORT`. `--sizes shipped,2x2,2x4,4x2` starts one server per size
  (WEB_CONCURRENCY x WEB_THREADS set for all but `shipped`, and the output says TUNED),
  all at once, idle but for the one being measured, the rounds alternating between
  them: sizing experiments compared in the same run.
- **Code versions in the same run.** `--compare CHECKOUT` also starts the web line of
  another checkout (a `git worktree` of an earlier commit with the same migrations),
  labelled `base`, the rounds alternating between the two: on a machine whose speed
  drifts by ±30% from minute to minute, only such pairs say what a change did.
- **An ordinary load generator.** wrk (installed with `apt-get install -y wrk` when
  missing, as root), one thread by default, `--latency`, keep-alive connections, script
  `tests/benchmarks/wrk/hotpaths.lua`. Its own CPU per request is printed, to show it is
  a fraction of the server's.
- **Hot paths, every request on a different session.** `--sessions` ACTIVE sessions on
  distinct slots are created before the run through the HTTP API, owned by a fleet of
  `--bots` bot clients (`ClientService.create(role="bot")`); the wrk script rotates over
  them, each request carrying its session's owner's token. So the shipped rate limit
  (`RATE_LIMIT_BOT=500/second` per client, unchanged) is spent by many bots, as in
  production, instead of one client hitting its budget. The paths: `GET /healthz` (the
  baseline), `GET /api/v1/sessions/{id}`, `POST …/{id}/heartbeat`, `POST …/{id}/messages`
  (one message, a unique `message_id` per request, `sender_role` robot, from the owning
  bot), `POST /api/v1/sessions` on a free slot (a unique shop per request).
- **Rounds that alternate.** After a warm-up of every path, each round runs every path
  for `--duration` seconds (the order rotated from round to round), for each
  `--connections` value. Each figure is the median over the rounds; each ratio is
  taken inside one round (path ÷ healthz of the same round), then the median.
- **Server CPU per request, by process**, read before and after each wrk run and divided
  by the requests wrk got answered: `web`, the gunicorn master and its workers
  (`/proc/<pid>/stat` utime + stime); `mariadb`, mariadbd; `redis`, redis-server; and
  `server` = their sum; then as a multiple of `GET /healthz`'s server CPU per request.
  This MariaDB may be shared with other users, so mariadbd is counted by thread
  (`/proc/<mariadbd>/task/<tid>/schedstat`, the threads of connections told apart by
  `information_schema.PROCESSLIST.TID`): `mariadb` = the threads serving connections to
  the bench database + the threads serving no connection (InnoDB's background work), and
  without the threads serving other clients' connections. The whole process
  (`/proc/<mariadbd>/stat`) is printed beside it (`mdb-all`, ratio `×hz-all`); on a
  machine of its own the two agree. Redis cannot be split so and is the whole process.
- **200 concurrent creates on one slot** (`--burst`): one burst from as many threads
  (requests encoded beforehand, released together by a barrier, each on a plain socket
  of its own opened in the burst; the generator's CPU printed), every answer counted,
  p50 / p99, and exactly one occupant checked in the database afterwards.
- **The floor** (`tests/benchmarks/floor.py`): the SQL statements each path issues,
  recorded from the app and replayed through bare PyMySQL, single-threaded, against a
  clone of the same database: driver CPU + mariadbd CPU per operation, and each path's
  server CPU per request as a multiple of its floor.

The table is printed at the end and written as JSON with `--json PATH`. Everything is
bounded (wrk runs for `--duration`, readiness and the burst have timeouts); the server is
stopped by its pid (SIGTERM, then SIGKILL to the master and its workers), the databases
dropped and the Redis db flushed in a `finally`. On a machine shared with other work the
absolute figures move with it; the ratios, taken inside one run, are the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pymysql

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.benchmarks.floor import (  # noqa: E402
    mariadbd_pid,
    pids_named,
    stat_cpu,
    thread_cpu,
)

BIN = Path(sys.executable).parent
LUA = Path(__file__).resolve().parent / "wrk" / "hotpaths.lua"
MYSQL_SERVER = os.environ.get("BENCH_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/10")
DB_NAME = "auto_session_bench_hotpaths"
KEY_PREFIX = "as-bench-hotpaths"
PATHS = ("healthz", "get", "heartbeat", "messages", "create")
LABELS = {
    "healthz": "GET /healthz",
    "get": "GET /sessions/{id}",
    "heartbeat": "POST …/heartbeat",
    "messages": "POST …/messages",
    "create": "POST /sessions",
}
CPU_AIMS = {"get": 2.0, "heartbeat": 3.0, "messages": 4.0, "create": 6.0}  # × healthz
TUNING_VARIABLES = ("WEB_CONCURRENCY", "WEB_THREADS", "WORKER_CONCURRENCY",
                    "GUNICORN_CMD_ARGS", "PORT", "HOST")


# ---- small helpers -----------------------------------------------------------------------
def log(message: str) -> None:
    print(message, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def median(values: list[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def server_params() -> dict[str, Any]:
    from sqlalchemy.engine import make_url

    url = make_url(MYSQL_SERVER)
    return {"host": url.host or "127.0.0.1", "port": url.port or 3306,
            "user": url.username or "root", "password": url.password or ""}


def admin_sql(*statements: str) -> None:
    params = server_params()
    conn = pymysql.connect(**params, charset="utf8mb4", autocommit=True)
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("wrk is not installed: apt-get install -y wrk (as root)")
    log("installing wrk: apt-get install -y wrk")
    install = ["apt-get", "install", "-y", "wrk"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        subprocess.run(install, env=env, check=True, capture_output=True, timeout=600)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk could not be installed")
    return found


def procfile_web_line() -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("web:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit("no web: line in the Procfile")


def server_env(database_url: str, port: int, size: tuple[int, int] | None) -> dict[str, str]:
    """The environment minus every setting of the app and every sizing variable; then
    only what the bench must say (where MariaDB and Redis are)."""
    from app.config import Settings

    settings_names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in settings_names and k.upper() not in TUNING_VARIABLES}
    env.update(DATABASE_URL=database_url, REDIS_URL=REDIS_URL, REDIS_KEY_PREFIX=KEY_PREFIX,
               PORT=str(port), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if size is not None:  # a sizing experiment: the run says TUNED
        env["WEB_CONCURRENCY"], env["WEB_THREADS"] = str(size[0]), str(size[1])
    return env


# ---- CPU meter -------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (gunicorn's master and workers), from /proc."""
    found = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += process_tree(int(child))
    except OSError:
        pass
    return found


def tasks_cpu(pid: int) -> dict[int, float]:
    found = {}
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found[int(task.name)] = thread_cpu(pid, int(task.name))
    except OSError:
        pass
    return found


class Meter:
    """CPU seconds of the server's processes, read before and after one wrk run.

    mariadbd is split by thread (`information_schema.PROCESSLIST.TID`): `db_conn`, the
    threads serving connections to the bench database; `db_others`, threads serving
    other clients' connections (whoever else uses this MariaDB); `db_bg`, the threads
    serving no connection (InnoDB's log writer, purge, page cleaner…, and connections
    that came and went between the two reads). `mariadbd` = db_conn + db_bg is the
    figure of the server's CPU; `mariadbd_all` is the whole process from /proc/<pid>/stat.
    """

    def __init__(self, master_pid: int, database: str) -> None:
        self.master = master_pid
        self.database = database
        self.mariadbd = mariadbd_pid()
        redis_pids = pids_named("redis-server")
        self.redis = redis_pids[0] if redis_pids else None
        self.monitor = pymysql.connect(**server_params(), autocommit=True)

    def connections(self) -> tuple[set[int], set[int]]:
        """TIDs of the mariadbd threads serving the bench database, and the others."""
        with self.monitor.cursor() as cur:
            cur.execute("SELECT TID, DB FROM information_schema.PROCESSLIST")
            rows = [(int(tid), db) for tid, db in cur.fetchall() if tid]
        return ({tid for tid, db in rows if db == self.database},
                {tid for tid, db in rows if db != self.database})

    def snapshot(self) -> dict[str, Any]:
        web = process_tree(self.master)
        ours, others = self.connections()
        return {
            "web": {pid: stat_cpu(f"/proc/{pid}/stat") for pid in web},
            "mariadbd_all": stat_cpu(f"/proc/{self.mariadbd}/stat"),
            "db_tasks": tasks_cpu(self.mariadbd),
            "ours": ours, "others": others,
            "redis": stat_cpu(f"/proc/{self.redis}/stat") if self.redis else 0.0,
            "at": time.monotonic(),
        }

    def delta(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
        by_pid = {pid: after["web"].get(pid, 0.0) - before["web"].get(pid, 0.0)
                  for pid in set(before["web"]) | set(after["web"])}
        web = sum(by_pid.values())
        workers = [spent for pid, spent in by_pid.items() if pid != self.master]
        tasks = set(before["db_tasks"]) | set(after["db_tasks"])
        ours = before["ours"] | after["ours"]
        others = (before["others"] | after["others"]) - ours

        def spent(tids: set[int]) -> float:
            # a thread id that ends and is given to a new thread between the two reads
            # (a connection closed, another opened) counts the new thread's CPU, never a
            # negative difference
            total = 0.0
            for t in tids:
                now, then = after["db_tasks"].get(t, 0.0), before["db_tasks"].get(t, 0.0)
                total += now - then if now >= then else now
            return total

        db_conn, db_others = spent(ours), spent(others)
        db_bg = spent(tasks - ours - others)
        return {"web": web, "mariadbd": db_conn + db_bg, "db_conn": db_conn, "db_bg": db_bg,
                # the busiest worker's share of the workers' CPU (see `lopsided`)
                "busiest_worker": max(workers) / sum(workers) if sum(workers) > 0 else 0.0,
                "db_others": db_others,
                "mariadbd_all": after["mariadbd_all"] - before["mariadbd_all"],
                "redis": after["redis"] - before["redis"],
                "seconds": after["at"] - before["at"]}

    def close(self) -> None:
        with contextlib.suppress(pymysql.MySQLError):
            self.monitor.close()


# ---- the server ------------------------------------------------------------------------
class Server:
    def __init__(self, env: dict[str, str], port: int, log_path: Path,
                 root: Path = ROOT) -> None:
        self.line = procfile_web_line()
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.log_file = log_path.open("wb")
        # exec: the shell becomes gunicorn, so this pid is gunicorn's master
        self.proc = subprocess.Popen(["sh", "-c", f"exec {self.line}"], cwd=root, env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.log_file)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("the web process exited:\n" + self.log_path.read_text()[-3000:])
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("the web process did not become ready:\n"
                         + self.log_path.read_text()[-3000:])

    def workers(self) -> list[int]:
        return process_tree(self.pid)[1:]

    def sizing(self) -> str:
        text = self.log_path.read_text(errors="replace")
        found = re.search(r"sizing: (.*)", text)
        if found:
            return found.group(1).strip()
        return f"{len(self.workers())} worker processes (no sizing line in gunicorn's log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            pids = process_tree(self.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait(10)
            for pid in pids[1:]:  # workers left behind by a master killed hard
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.log_file.close()


# ---- preparation -----------------------------------------------------------------------
def prepare_database(name: str) -> str:
    from sqlalchemy.engine import make_url

    admin_sql(f"DROP DATABASE IF EXISTS `{name}`",
              f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    url = make_url(MYSQL_SERVER).set(database=name).render_as_string(hide_password=False)
    from app import migrate

    migrate.upgrade(url)
    return url


def flush_redis() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()
    finally:
        client.close()


def create_bots(url: str, count: int) -> list[tuple[str, str]]:
    from app.clients.service import ClientService
    from app.db import Database

    database = Database(url)
    try:
        service = ClientService(database)
        issued = [service.create(name=f"bench-bot-{n}", role="bot") for n in range(count)]
    finally:
        database.dispose()
    return [(t.client_id, t.token) for t in issued]


def seed_sessions(base: str, tokens: list[str], count: int, prefix: str) -> list[tuple[str, str]]:
    """`count` ACTIVE sessions on distinct slots through the API, session n owned by bot
    n mod len(tokens); returns [(session_id, owner's token)] in that order."""
    result: list[tuple[str, str] | None] = [None] * count
    problems: Counter[str] = Counter()

    stop = threading.Event()

    def bot(b: int) -> None:
        headers = {"Authorization": f"Bearer {tokens[b]}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            for n in range(b, count, len(tokens)):
                for _attempt in range(5):
                    if stop.is_set():
                        return
                    response = client.post("/api/v1/sessions", json={
                        "account_id": "bench", "shop_id": f"{prefix}-{n}",
                        "session_type": "AUTO_BARGAIN"})
                    if response.status_code == 201:
                        result[n] = (response.json()["session_id"], tokens[b])
                        break
                    problems[str(response.status_code)] += 1
                    time.sleep(float(response.headers.get("Retry-After", "0.2")))

    with ThreadPoolExecutor(len(tokens)) as pool:
        try:
            list(pool.map(bot, range(len(tokens))))
        except BaseException:
            stop.set()
            raise
    missing = sum(1 for r in result if r is None)
    if missing:
        raise SystemExit(f"{missing} of {count} sessions could not be created: {dict(problems)}")
    return [r for r in result if r is not None]


# ---- wrk -------------------------------------------------------------------------------
def run_wrk(wrk: str, base: str, path: str, ids_file: Path, connections: int, threads: int,
            duration: float, tag: str) -> dict[str, Any]:
    threads = max(1, min(threads, connections))
    command = [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
               "--timeout", "10s", "--latency", "-s", str(LUA), base,
               "--", path, str(ids_file), tag, str(threads)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killer = threading.Timer(duration + 60, lambda: proc.kill())
    killer.start()
    try:
        out, err = proc.communicate()
    finally:
        killer.cancel()
    # communicate() reaped the child: its CPU is in RUSAGE_CHILDREN (measured around)
    text = out.decode(errors="replace")
    found = re.search(r"^WRKJSON (.*)$", text, re.M)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"wrk failed ({proc.returncode}): {err.decode()[-2000:]}\n{text[-2000:]}")
    result: dict[str, Any] = json.loads(found.group(1))
    return result


def measure(meter: Meter, wrk: str, base: str, path: str, ids_file: Path, connections: int,
            args: argparse.Namespace, tag: str) -> dict[str, Any]:
    import resource

    before = meter.snapshot()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_wrk(wrk, base, path, ids_file, connections, args.wrk_threads, args.duration,
                     tag)
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = meter.snapshot()
    cpu = meter.delta(before, after)
    cpu["wrk"] = (children1.ru_utime + children1.ru_stime
                  - children0.ru_utime - children0.ru_stime)
    requests = max(int(result["requests"]), 1)
    codes = {int(k): v for k, v in result["codes"].items()}
    ok = sum(v for k, v in codes.items() if 200 <= k < 300)
    errors = result["errors"]
    per = {k: v / requests * 1e6 for k, v in cpu.items()
           if k not in ("seconds", "busiest_worker")}  # µs / request
    per["server"] = per["web"] + per["mariadbd"] + per["redis"]
    per["server_all"] = per["web"] + per["mariadbd_all"] + per["redis"]
    return {
        "path": path, "connections": connections,
        "requests": result["requests"],
        "rps": result["requests"] / (result["duration_us"] / 1e6),
        "p50_ms": result["latency_us"]["p50"] / 1000,
        "p90_ms": result["latency_us"]["p90"] / 1000,
        "p99_ms": result["latency_us"]["p99"] / 1000,
        "max_ms": result["latency_us"]["max"] / 1000,
        "non_2xx": sum(codes.values()) - ok,
        "socket_errors": errors["connect"] + errors["read"] + errors["write"]
        + errors["timeout"],
        "codes": codes,
        "cpu_us": per,
        "cpu_seconds": cpu,
        "busiest_worker": cpu["busiest_worker"],
    }


# A run in which one web worker did nearly all the work: wrk opens its few keep-alive
# connections at once, and now and then all of them land on one worker, the other idle
# for the whole run (on one shared listening socket the first-woken worker took them;
# with a socket a worker, `reuse_port`, the kernel's hash still puts all 4 of 4 on one
# worker about one run in eight). Such a run is another machine (one core; two
# request threads on one GIL): half the throughput and ~1.5x the CPU per request (seen
# for healthz: ~1,300 against ~3,300 req/s, ~800 against ~550 µs). Reported, and kept
# out of the ratios' second median (`x_healthz_even`), since a ratio of one kind of run
# to the other measures the accident.
LOPSIDED_SHARE = 0.9


def lopsided(m: dict[str, Any]) -> bool:
    return bool(m.get("busiest_worker", 0.0) >= LOPSIDED_SHARE)


# ---- 200 creates on one slot -------------------------------------------------------------
def burst_on_one_slot(base: str, tokens: list[str], size: int, url: str,
                      slot: str = "one-slot") -> dict[str, Any]:
    """`size` creates on one slot at once, each on a connection of its own opened in the
    burst (as `size` bots arriving together). The requests are encoded before the
    barrier and sent over plain sockets (`Connection: close`), so the generator's own
    CPU (printed) stays a small fraction of the server's."""
    host, port = base.removeprefix("http://").split(":")
    requests: list[bytes] = []
    for n in range(size):
        body = json.dumps({"account_id": "bench-burst", "shop_id": slot,
                           "session_type": "AUTO_BARGAIN" if n % 2 else "AUTO_FOLLOW_UP"})
        requests.append((
            f"POST /api/v1/sessions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {tokens[n % len(tokens)]}\r\n"
            "Content-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    barrier = threading.Barrier(size + 1, timeout=60)
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    lock = threading.Lock()

    def one(n: int) -> None:
        barrier.wait()
        started = time.perf_counter()
        try:
            with socket.create_connection((host, int(port)), timeout=60) as sock:
                sock.sendall(requests[n])
                answer = bytearray()
                while chunk := sock.recv(65536):
                    answer += chunk
            code = answer[9:12].decode() if answer.startswith(b"HTTP/1.") else "garbled"
        except OSError as exc:
            code = exc.__class__.__name__
        elapsed = time.perf_counter() - started
        with lock:
            latencies.append(elapsed)
            codes[code] += 1

    pool = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(size)]
    for t in pool:
        t.start()
    cpu_before = time.process_time()
    barrier.wait()
    began = time.perf_counter()
    for t in pool:
        t.join(120)
    generator_cpu = time.process_time() - cpu_before
    wall = time.perf_counter() - began
    from sqlalchemy.engine import make_url

    params = server_params()
    conn = pymysql.connect(**params, database=make_url(url).database, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM sessions WHERE account_id = 'bench-burst' AND "
                        "shop_id = %s AND status IN ('ACTIVE', 'TRANSFERRED')", (slot,))
            occupants = int(cur.fetchone()[0])
            cur.execute("SELECT status, COUNT(*) FROM sessions WHERE account_id = "
                        "'bench-burst' AND shop_id = %s GROUP BY status", (slot,))
            statuses = {str(s): int(c) for s, c in cur.fetchall()}
    finally:
        conn.close()
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0

    return {"requests": size, "answered": sum(v for k, v in codes.items() if k.isdigit()),
            "codes": dict(codes), "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "max_ms": ordered[-1] * 1000 if ordered else 0, "wall_s": wall,
            "occupants": occupants, "statuses": statuses,
            "generator_cpu_ms": generator_cpu * 1000}


# ---- the floor ---------------------------------------------------------------------------
def run_floor(env: dict[str, str], workdir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    spec_path, out_path = workdir / "floor-in.json", workdir / "floor-out.json"
    spec_path.write_text(json.dumps(spec))
    floor_env = {k: v for k, v in env.items() if k != "PORT"}
    done = subprocess.run([sys.executable, "-m", "tests.benchmarks.floor", "--input",
                           str(spec_path), "--output", str(out_path)], cwd=ROOT,
                          env=floor_env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        log(f"floor failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return {}
    result: dict[str, Any] = json.loads(out_path.read_text())
    return result


# ---- summary ---------------------------------------------------------------------------
def ratios(ms: list[dict[str, Any]], base: dict[int, dict[str, Any]], key: str, *,
           even: bool = False) -> list[float]:
    """Each run's `key` per request over healthz's (`base`, by round) in the same round;
    `even`: only the rounds where neither run was lopsided."""
    return [m["cpu_us"][key] / base[m["round"]]["cpu_us"][key]
            for m in ms if m["round"] in base and base[m["round"]]["cpu_us"][key]
            and not (even and (lopsided(m) or lopsided(base[m["round"]])))]


def summarize(rounds: list[dict[str, Any]], paths: list[str],
              connections: list[int]) -> list[dict[str, Any]]:
    rows = []
    for c in connections:
        base = {m["round"]: m for m in rounds
                if m["connections"] == c and m["path"] == "healthz"}
        for path in paths:
            ms = [m for m in rounds if m["connections"] == c and m["path"] == path]
            if not ms:
                continue
            ratios_even = ratios(ms, base, "server", even=True)
            even = [m for m in ms if not lopsided(m)]
            p50 = median([m["p50_ms"] for m in ms])
            p99 = median([m["p99_ms"] for m in ms])
            row = {
                "path": path, "label": LABELS[path], "connections": c, "rounds": len(ms),
                "rps": median([m["rps"] for m in ms]),
                "p50_ms": p50, "p99_ms": p99, "p99_worst_ms": max(m["p99_ms"] for m in ms),
                "non_2xx": sum(m["non_2xx"] for m in ms),
                "socket_errors": sum(m["socket_errors"] for m in ms),
                "requests": sum(m["requests"] for m in ms),
                "cpu_us": {k: median([m["cpu_us"][k] for m in ms]) for k in ms[0]["cpu_us"]},
                "x_healthz": median(ratios(ms, base, "server")),
                "x_healthz_all": median(ratios(ms, base, "server_all")),
                "x_healthz_web": median(ratios(ms, base, "web")),
                "lopsided_rounds": len(ms) - len(even),
                "cpu_us_even": {k: median([m["cpu_us"][k] for m in even])
                                for k in ms[0]["cpu_us"]} if even else {},
                "x_healthz_even": median(ratios_even) if ratios_even else float("nan"),
            }
            aims = []
            if path == "healthz":
                aims.append(("baseline", True, "baseline"))
            if path in CPU_AIMS:
                aims.append(("cpu", row["x_healthz"] <= CPU_AIMS[path],
                             f"≤{CPU_AIMS[path]:g}×"))
            if path == "healthz":
                pass
            elif c <= 4:
                aims.append(("p99", p99 <= 50, "p99≤50ms"))
            else:
                aims.append(("tail", p99 <= 4 * p50, "p99≤4×p50"))
            row["aims"] = [{"what": w, "met": bool(ok), "aim": a} for w, ok, a in aims]
            rows.append(row)
    return rows


def fmt(value: float, digits: int = 0) -> str:
    if value != value:  # nan
        return "-"
    return f"{value:.{digits}f}"


def print_table(rows: list[dict[str, Any]], floor: dict[str, Any]) -> None:
    head = (f"{'path':20s} {'conn':>4s} {'req/s':>6s} {'p50ms':>6s} {'p99ms':>6s} "
            f"{'non2xx':>6s} | {'web':>5s} {'mariadb':>7s} {'redis':>5s} {'server':>6s} | "
            f"{'×hz':>5s} {'×floor':>6s} | {'mdb-all':>7s} {'×hz-all':>7s} {'×web':>5s} "
            f"{'wrk':>4s} | aims")
    log("\nCPU in µs per request, median of the rounds; ×hz = server CPU per request ÷ GET "
        "/healthz's (same round, then median);\n×floor = server ÷ the path's floor; mdb-all ="
        " the whole mariadbd process (other clients included); ×web = web alone ÷ healthz's;"
        "\nwrk = the load generator's own CPU")
    log(head)
    log("-" * len(head))
    for r in rows:
        cpu = r["cpu_us"]
        fl = floor.get(r["path"], {}) if floor else {}
        x_floor = cpu["server"] / fl["floor_us"] if fl.get("floor_us") else float("nan")
        aims = "  ".join(a["aim"] if a["what"] == "baseline" else
                         f"{a['aim']} {'ok' if a['met'] else 'MISSED'}" for a in r["aims"])
        log(f"{r['label']:20s} {r['connections']:>4d} {fmt(r['rps']):>6s} "
            f"{fmt(r['p50_ms'], 1):>6s} {fmt(r['p99_ms'], 1):>6s} {r['non_2xx']:>6d} | "
            f"{fmt(cpu['web']):>5s} {fmt(cpu['mariadbd']):>7s} {fmt(cpu['redis']):>5s} "
            f"{fmt(cpu['server']):>6s} | {fmt(r['x_healthz'], 2):>5s} {fmt(x_floor, 1):>6s} | "
            f"{fmt(cpu['mariadbd_all']):>7s} {fmt(r['x_healthz_all'], 2):>7s} "
            f"{fmt(r['x_healthz_web'], 2):>5s} {fmt(cpu['wrk']):>4s} | {aims}")
    if any(r["lopsided_rounds"] for r in rows):
        log(f"\nrounds in which one web worker did ≥{LOPSIDED_SHARE:.0%} of the work (it took "
            "all of wrk's connections; see `lopsided`), and the figures without them:")
        for r in rows:
            even = r["cpu_us_even"]
            log(f"{r['label']:20s} {r['connections']:>4d}  one worker in "
                f"{r['lopsided_rounds']}/{r['rounds']}  server "
                f"{fmt(even.get('server', float('nan'))):>6s} µs  ×hz "
                f"{fmt(r['x_healthz_even'], 2)} (rounds where neither was)")


def print_floor(floor: dict[str, Any]) -> None:
    if not floor:
        log("\nfloor: not measured")
        return
    if floor.get("_diverged"):
        log(f"\nfloor: void, the replay diverged from the recording: {floor['_diverged']}")
        return
    log("\nfloor: each path's recorded SQL replayed through bare PyMySQL, single-threaded, "
        "on a clone of the bench database (µs per operation)")
    log(f"{'path':20s} {'driver':>7s} {'db-conn':>7s} {'floor':>7s} {'mariadbd':>8s} "
        f"{'stmts':>5s} {'commit':>6s} {'rollbk':>6s} {'ping':>5s} {'redis':>5s} "
        f"{'rowcnt≠':>7s} {'errors':>6s}")
    for path in ("get", "heartbeat", "messages", "create"):
        f = floor.get(path)
        if not f:
            continue
        per = f["per_request"]
        stmts = per.get("execute", 0) + per.get("executemany", 0)
        log(f"{LABELS[path]:20s} {fmt(f['driver_us']):>7s} {fmt(f['mariadbd_threads_us']):>7s} "
            f"{fmt(f['floor_us']):>7s} {fmt(f['mariadbd_process_us']):>8s} {stmts:>5.2f} "
            f"{per.get('commit', 0):>6.2f} {per.get('rollback', 0):>6.2f} "
            f"{per.get('ping', 0):>5.2f} {f['redis_round_trips_per_request']:>5.2f} "
            f"{f['rowcount_mismatches']:>7d} {f['errors']:>6d}")
    for path in ("get", "heartbeat", "messages", "create"):
        f = floor.get(path)
        if f:
            log(f"  {LABELS[path]} statements (per request):")
            for s in f["statements"]:
                sql = s["sql"] if len(s["sql"]) <= 150 else s["sql"][:150] + "…"
                log(f"    {s['per_request']:5.2f}  {sql}")
    if floor.get("_capture_failures"):
        log(f"  capture: non-2xx answers {floor['_capture_failures']} "
            f"e.g. {floor.get('_capture_samples')}")
    if floor.get("_errors"):
        log(f"  replay errors: {floor['_errors']}")


# ---- main ------------------------------------------------------------------------------
def parse_sizes(text: str | None) -> list[tuple[int, int] | None]:
    if not text:
        return [None]
    sizes: list[tuple[int, int] | None] = []
    for part in text.split(","):
        if part.strip() in ("", "shipped"):
            sizes.append(None)
            continue
        found = re.fullmatch(r"\s*(\d+)x(\d+)\s*", part)
        if not found:
            raise SystemExit(f"--sizes: {part!r} is not WORKERSxTHREADS (e.g. 2x4)")
        sizes.append((int(found.group(1)), int(found.group(2))))
    return sizes


def size_label(size: tuple[int, int] | None) -> str:
    return "shipped" if size is None else f"{size[0]}x{size[1]}"


def print_sizes(results: dict[str, dict[str, Any]]) -> None:
    """Sizing experiments side by side: server CPU per request and latency, per path."""
    labels = list(results)
    log("\nsizes compared in the same run (rounds alternate between the servers): server "
        "CPU µs/request  p50 / p99 ms  req/s")
    by_key: dict[tuple[int, str], dict[str, Any]] = {}
    for label in labels:
        for row in results[label]["summary"]:
            by_key.setdefault((row["connections"], row["path"]), {})[label] = row
    log(f"{'path':20s} {'conn':>4s} " + " ".join(f"{label:>28s}" for label in labels))
    for (c, path), cells in by_key.items():
        out = []
        for label in labels:
            r = cells.get(label)
            out.append(f"{fmt(r['cpu_us']['server']):>6s} {fmt(r['p50_ms'], 1):>5s}/"
                       f"{fmt(r['p99_ms'], 1):>6s} {fmt(r['rps']):>6s}" if r else " " * 28)
        log(f"{LABELS[path]:20s} {c:>4d} " + " ".join(f"{o:>28s}" for o in out))
    for label in labels:
        b = results[label].get("burst") or {}
        hot = [r for r in results[label]["summary"] if r["path"] != "healthz"]
        if hot:
            log(f"  {label:>8s}: mean server CPU over the hot paths "
                f"{statistics.mean(r['cpu_us']['server'] for r in hot):.0f} µs/request, "
                f"worst p99 {max(r['p99_ms'] for r in hot):.1f} ms"
                + (f", burst p99 {b['p99_ms']:.0f} ms" if b else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", default="4,16", help="comma-separated")
    parser.add_argument("--json", type=Path, help="write the summary as JSON here")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help="comma-separated subset of " + ",".join(PATHS))
    parser.add_argument("--sessions", type=int, default=4000, help="pre-created sessions")
    parser.add_argument("--bots", type=int, default=16, help="bot clients owning them")
    parser.add_argument("--warmup", type=int, default=3, help="seconds per path")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--burst", type=int, default=200, help="0: skip the one-slot burst")
    parser.add_argument("--floor-requests", type=int, default=500,
                        help="recorded requests per path for the floor; 0: skip the floor")
    parser.add_argument("--sizes", help="sizing experiments, e.g. shipped,2x2,2x4,4x2: one "
                        "server per size (WEB_CONCURRENCY x WEB_THREADS; 'shipped' = none "
                        "set), all started at once, rounds alternating between them")
    parser.add_argument("--compare", type=Path, metavar="CHECKOUT",
                        help="also run the web process of another checkout of the project "
                        "(e.g. a `git worktree` of an earlier commit, same migrations), "
                        "shipped sizing, labelled 'base': code versions compared in the "
                        "same run, rounds alternating")
    parser.add_argument("--database", default=DB_NAME)
    args = parser.parse_args()
    connections = [int(c) for c in args.connections.split(",") if c.strip()]
    paths = [p for p in args.paths.split(",") if p]
    if "healthz" not in paths:
        paths.insert(0, "healthz")
    unknown = set(paths) - set(PATHS)
    if unknown or args.rounds < 1 or args.duration <= 0 or not connections:
        parser.error(f"bad arguments (unknown paths: {sorted(unknown)})")
    sizes = parse_sizes(args.sizes)
    if (ROOT / ".env").exists():
        log("warning: ./.env exists; the server reads it (its settings are not the defaults)")
    # SIGTERM (e.g. `timeout`) runs the clean-up below, as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    wrk = ensure_wrk()
    wrk_version = subprocess.run([wrk, "--version"], capture_output=True, text=True,
                                 timeout=10).stdout.splitlines()[:1]
    run_id = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="bench-hotpaths-"))
    cores = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()
    started = time.monotonic()
    servers: dict[str, Server] = {}
    meters: dict[str, Meter] = {}
    report: dict[str, Any] = {}
    replay_db = f"{args.database}_floor"
    try:
        log(f"preparing database {args.database} and Redis {REDIS_URL} …")
        flush_redis()
        url = prepare_database(args.database)
        bots = create_bots(url, args.bots)
        tokens = [token for _, token in bots]
        envs: dict[str, dict[str, str]] = {}
        for size in sizes:
            label = size_label(size)
            port = free_port()
            envs[label] = server_env(url, port, size)
            servers[label] = Server(envs[label], port, workdir / f"gunicorn-{label}.log")
        if args.compare is not None:  # the other checkout's code, the same environment
            port = free_port()
            envs["base"] = {**server_env(url, port, None),
                            "PYTHONPATH": str(args.compare.resolve())}
            servers["base"] = Server(envs["base"], port, workdir / "gunicorn-base.log",
                                     root=args.compare.resolve())
        for server in servers.values():
            server.wait_ready()
        sizing = {label: server.sizing() for label, server in servers.items()}
        first = next(iter(servers.values()))
        log(f"web: {first.line}")
        for label, text in sizing.items():
            log(f"     {label}: {text}")
        floor_count = (len(tokens) + args.floor_requests) if args.floor_requests else 0
        log(f"creating {args.sessions + floor_count} sessions for {args.bots} bots …")
        seeded = seed_sessions(first.base, tokens, args.sessions + floor_count, f"s{run_id}")
        hot, reserved = seeded[:args.sessions], seeded[args.sessions:]
        ids_file = workdir / "sessions.txt"
        ids_file.write_text("".join(f"{sid} {token}\n" for sid, token in hot))

        floor: dict[str, Any] = {}
        if args.floor_requests:
            log(f"floor: recording {args.floor_requests} requests per path, replaying them "
                "through PyMySQL …")
            floor = run_floor(next(iter(envs.values())), workdir, {
                "server": server_params(), "source_db": args.database, "replay_db": replay_db,
                "sessions": reserved, "tokens": tokens, "requests": args.floor_requests,
                "tag": run_id})

        meters = {label: Meter(server.pid, args.database) for label, server in servers.items()}
        log(f"warm-up: {args.warmup:g} s per path at {max(connections)} connections …")
        for label, server in servers.items():
            for path in paths:
                run_wrk(wrk, server.base, path, ids_file, max(connections), args.wrk_threads,
                        args.warmup, f"w{run_id}{label}{path}")
        measurements: list[dict[str, Any]] = []
        labels = list(servers)
        for c in connections:
            for r in range(args.rounds):
                for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                    order = paths[r % len(paths):] + paths[:r % len(paths)]
                    for path in order:
                        m = measure(meters[label], wrk, servers[label].base, path, ids_file,
                                    c, args, f"c{c}r{r}{run_id}{label}{path}")
                        m["round"], m["size"] = r, label
                        measurements.append(m)
                        log(f"  {label:>7s} c={c:<3d} round {r + 1}/{args.rounds} "
                            f"{LABELS[path]:20s} {m['rps']:6.0f} req/s  p50 {m['p50_ms']:6.1f}"
                            f"  p99 {m['p99_ms']:6.1f} ms  non-2xx {m['non_2xx']}  server "
                            f"{m['cpu_us']['server']:5.0f} µs/req  (other db clients "
                            f"{m['cpu_us']['db_others']:4.0f})"
                            + ("  ONE WORKER" if lopsided(m) else ""))
        results: dict[str, dict[str, Any]] = {}
        for label, server in servers.items():
            burst: dict[str, Any] = {}
            if args.burst:
                log(f"burst ({label}): {args.burst} concurrent creates on one slot …")
                burst = burst_on_one_slot(server.base, tokens, args.burst, url,
                                          slot=f"one-slot-{label}")
            results[label] = {
                "sizing": sizing[label],
                "summary": summarize([m for m in measurements if m["size"] == label], paths,
                                     connections),
                "burst": burst,
            }
        load_after = os.getloadavg()

        log("\n" + "=" * 100)
        log(f"hot paths of the Procfile's web process — {time.strftime('%Y-%m-%d %H:%M')}, "
            f"{cores} cores, load average {load_before[0]:.2f} before / {load_after[0]:.2f} "
            "after")
        busiest = max((r["rps"] for res in results.values() for r in res["summary"]
                       if r["path"] != "healthz"), default=0.0)
        log(f"load: {wrk_version[0] if wrk_version else 'wrk'}, {args.wrk_threads} thread(s), "
            f"{args.rounds} rounds × {args.duration:g} s per path and connection count, "
            f"after {args.warmup:g} s warm-up per path")
        log(f"sessions: {args.sessions} ACTIVE on distinct slots, owned by a fleet of "
            f"{args.bots} bot clients; each request on a different session with its owner's "
            "token, so the shipped RATE_LIMIT_BOT=500/second applies per bot (the busiest "
            f"API path, {fmt(busiest)} req/s, is {fmt(busiest / args.bots)} req/s per bot)")
        log("machine shared with other work: absolute figures move with it; the ratios, "
            "taken inside each round, are the figures")
        for label, res in results.items():
            log(f"\nweb: {first.line}\n     {res['sizing']}"
                + ("  (no tuning variable set)" if label == "shipped" else
                   f"  (TUNED: WEB_CONCURRENCY x WEB_THREADS = {label})"))
            print_table(res["summary"], floor)
            b = res["burst"]
            if b:
                log(f"{args.burst} concurrent creates on one slot: answered {b['answered']}"
                    f"/{b['requests']}, codes {b['codes']}, p50 {b['p50_ms']:.0f} ms, "
                    f"p99 {b['p99_ms']:.0f} ms (aim < 1000), max {b['max_ms']:.0f} ms, wall "
                    f"{b['wall_s']:.2f} s (generator CPU {b['generator_cpu_ms']:.0f} ms); "
                    f"occupants afterwards {b['occupants']} (must be 1), statuses "
                    f"{b['statuses']}")
        if len(results) > 1:
            print_sizes(results)
        print_floor(floor)
        main_label = "shipped" if "shipped" in results else labels[0]
        report = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "cores": cores,
            "load_average": {"before": load_before, "after": load_after},
            "web_line": first.line, "wrk": wrk_version,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "sizing": results[main_label]["sizing"], "tuned": main_label != "shipped",
            "summary": results[main_label]["summary"], "burst": results[main_label]["burst"],
            "sizes": results, "floor": floor, "measurements": measurements,
            "elapsed_s": time.monotonic() - started,
        }
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))
            log(f"\nJSON: {args.json}")
    finally:
        for meter in meters.values():
            meter.close()
        for server in servers.values():
            server.stop()
        with contextlib.suppress(Exception):
            admin_sql(f"DROP DATABASE IF EXISTS `{args.database}`",
                      f"DROP DATABASE IF EXISTS `{replay_db}`")
        with contextlib.suppress(Exception):
            flush_redis()
        shutil.rmtree(workdir, ignore_errors=True)
    bursts = [res["burst"] for res in report.get("sizes", {}).values() if res["burst"]]
    failed = any(b.get("occupants") != 1 for b in bursts)
    return 1 if failed or not report else 0


if __name__ == "__main__":
    sys.exit(main())
