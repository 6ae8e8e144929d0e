"""Instructions per request of the hot paths, counted by valgrind (run by hand, never by pytest).

    .venv/bin/python -m tests.benchmarks.bench_instructions [--requests 60] \
        [--paths healthz,get,heartbeat,messages,create] [--compare CHECKOUT]

Why: on a shared machine the CPU time of the same request moves by ±50% from one
5-second round to the next (`bench_hotpaths` shows it), so a change of 10% in what a
request costs cannot be told from noise by timing. The number of instructions the
process executes for a request can: callgrind counts them, the same from run to run,
whatever else the machine does. It is not the aims' figure (those are server CPU from
`bench_hotpaths`, MariaDB and Redis included); it is how code versions are compared.

What it counts: the app's WSGI callable (`app.wsgi:app`, as gunicorn loads it) called
directly in one process — no gunicorn, no socket, so healthz here is the app's share of
a healthz, not the ~400 µs of gunicorn around it — on MariaDB + Redis (a scratch
database, created, migrated and dropped here; Redis db 11 with a key prefix of its own,
flushed). A bot client is created; the bot's rate limit is raised for the run (the only
setting changed: one client sends every request). For each path, `--requests` requests
are made first to warm every cache, then `--requests` more inside one call of
`functools.reduce`, and callgrind collects only inside that call
(`--toggle-collect=functools_reduce`): the instructions of exactly those requests, on
the request's own thread (the app's background threads run outside it).

Each (checkout, path) runs in a process of its own under valgrind, as many at once as
there are cores; `--compare CHECKOUT` also counts another checkout of the code (a `git
worktree`, with the same migrations), labelled `base`.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PATHS = ("healthz", "get", "heartbeat", "messages", "create")
DB_NAME = "auto_session_bench_instructions"
REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/11")


def child_env(checkout: Path, database_url: str, token_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(DATABASE_URL=database_url, REDIS_URL=REDIS_URL,
               REDIS_KEY_PREFIX="bench-instr", RATE_LIMIT_BOT="1000000/second",
               SECRET_KEY="bench-instructions-" + "x" * 32, LOG_LEVEL="WARNING",
               PYTHONPATH=str(checkout), BENCH_TOKEN_FILE=str(token_file))
    return env


def prepare(token_file: Path) -> str:
    """The scratch database (as `bench_hotpaths` makes its own), Redis flushed, a bot."""
    import redis

    from app.clients.service import ClientService
    from app.db import Database
    from tests.benchmarks.bench_hotpaths import prepare_database

    url = prepare_database(DB_NAME)
    redis.Redis.from_url(REDIS_URL).flushdb()
    database = Database(url)
    try:
        token_file.write_text(ClientService(database).create(name="bench", role="bot").token)
    finally:
        database.dispose()
    return url


def drop() -> None:
    import redis

    from tests.benchmarks.bench_hotpaths import admin_sql

    admin_sql(f"DROP DATABASE IF EXISTS `{DB_NAME}`")
    redis.Redis.from_url(REDIS_URL).flushdb()


def child(path: str, count: int) -> None:
    """Inside valgrind: warm up, then `count` requests of `path` inside `reduce`."""
    import logging

    from app.wsgi import app

    logging.disable(logging.WARNING)
    token = Path(os.environ["BENCH_TOKEN_FILE"]).read_text().strip()
    tag = uuid.uuid4().hex[:8]

    def call(method: str, url: str, body: Any = None) -> tuple[str, bytes]:
        data = json.dumps(body).encode() if body is not None else b""
        environ = {"REQUEST_METHOD": method, "PATH_INFO": url, "QUERY_STRING": "",
                   "SERVER_NAME": "bench", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
                   "wsgi.input": io.BytesIO(data), "CONTENT_LENGTH": str(len(data)),
                   "CONTENT_TYPE": "application/json", "REMOTE_ADDR": "127.0.0.1",
                   "HTTP_AUTHORIZATION": "Bearer " + token, "wsgi.errors": sys.stderr,
                   "SERVER_PROTOCOL": "HTTP/1.1"}
        status: list[str] = []
        out = b"".join(app(environ, lambda s, h, e=None: status.append(s)))
        return status[0], out

    def expect(answer: tuple[str, bytes], code: str) -> bytes:
        if not answer[0].startswith(code):
            raise SystemExit(f"{path}: {answer[0]} {answer[1][:300]!r}")
        return answer[1]

    def create(shop: str) -> str:
        body = {"account_id": "bench", "shop_id": shop, "session_type": "AUTO_BARGAIN"}
        return str(json.loads(expect(call("POST", "/api/v1/sessions", body), "201"))
                   ["session_id"])

    sessions = [create(f"s{tag}-{i}") for i in range(2 * count)] if path != "create" \
        and path != "healthz" else []

    def one(i: int) -> None:
        if path == "healthz":
            expect(call("GET", "/healthz"), "200")
        elif path == "get":
            expect(call("GET", f"/api/v1/sessions/{sessions[i]}"), "200")
        elif path == "heartbeat":
            expect(call("POST", f"/api/v1/sessions/{sessions[i]}/heartbeat"), "200")
        elif path == "messages":
            expect(call("POST", f"/api/v1/sessions/{sessions[i]}/messages", {"messages": [
                {"message_id": f"m{tag}-{i}", "content": "how much for two?",
                 "sender_role": "robot"}]}), "20")
        else:
            create(f"c{tag}-{i}")

    for i in range(count):  # warm-up
        one(i)
    functools.reduce(lambda _, i: one(i), range(count, 2 * count), None)


def count_instructions(checkout: Path, path: str, count: int, database_url: str,
                       token_file: Path, workdir: Path) -> int:
    out = workdir / f"callgrind.{uuid.uuid4().hex}.out"
    command = ["valgrind", "--tool=callgrind", "--collect-atstart=no",
               "--toggle-collect=functools_reduce", f"--callgrind-out-file={out}",
               sys.executable, str(Path(__file__).resolve()),  # this file, the app of `checkout`
               "--child", path, "--requests", str(count)]
    done = subprocess.run(command, cwd=checkout, env=child_env(checkout, database_url, token_file),
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0 or not out.exists():
        raise SystemExit(f"{checkout} {path}: valgrind failed\n{done.stderr[-3000:]}")
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1]) // count
    raise SystemExit(f"{checkout} {path}: no totals in {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--compare", type=Path, metavar="CHECKOUT")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.requests)
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install -y valgrind")
    paths = [p for p in args.paths.split(",") if p]
    checkouts = {"current": ROOT}
    if args.compare is not None:
        checkouts["base"] = args.compare.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        token_file = workdir / "token"
        database_url = prepare(token_file)
        try:
            jobs = [(label, path) for label in checkouts for path in paths]
            with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
                counts = dict(zip(jobs, pool.map(
                    lambda job: count_instructions(checkouts[job[0]], job[1], args.requests,
                                                   database_url, token_file, workdir),
                    jobs), strict=True))
        finally:
            drop()
    print(f"instructions per request (callgrind, {args.requests} requests after "
          f"{args.requests} of warm-up, in one process, the WSGI app called directly)")
    header = f"{'path':12s}" + "".join(f"{label:>14s} {'×hz':>6s}" for label in checkouts)
    if "base" in checkouts:
        header += f"{'change':>9s}"
    print(header)
    for path in paths:
        line = f"{path:12s}"
        for label in checkouts:
            n = counts[(label, path)]
            hz = counts.get((label, "healthz"))
            line += f"{n:14,d} {n / hz if hz else float('nan'):6.2f}"
        if "base" in checkouts:
            line += f"{counts[('current', path)] / counts[('base', path)] - 1:+9.1%}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
