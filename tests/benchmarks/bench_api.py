"""HTTP API throughput under gunicorn on MariaDB + Redis (run by hand, not by pytest).

    .venv/bin/python tests/benchmarks/bench_api.py [--rounds 3] [--seconds 6] [--threads 16] \
        [--workers 2] [--web-threads 4]

Starts gunicorn on a free 127.0.0.1 port against a scratch database
(`auto_session_bench_api`) and Redis db 1, then measures with a threaded httpx load
generator on loopback, in the same run:

1. GET /healthz: requests per second, p50 / p99 latency (the baseline);
2. POST /api/v1/sessions on distinct slots: creations per second, p50 / p99, and the
   ratio to the healthz rate (aim: >= 0.35);
3. 200 concurrent creations on ONE slot: exactly one occupant afterwards; p99.

Phases 1 and 2 alternate for `--rounds` rounds and each round's ratio is taken from
its two adjacent phases, so that drift in what else the machine does moves both
sides alike; the median round is the figure. CPU seconds per request of the server
(gunicorn and its workers), the database and this load generator are printed too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DB_SERVER = os.environ.get("BENCH_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/")
DB_NAME = "auto_session_bench_api"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_database() -> str:
    server = sa.engine.make_url(DB_SERVER)
    engine = sa.create_engine(server)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{DB_NAME}`")
        conn.exec_driver_sql(f"CREATE DATABASE `{DB_NAME}` CHARACTER SET utf8mb4")
    engine.dispose()
    url = server.set(database=DB_NAME).render_as_string(hide_password=False)
    from app import migrate

    migrate.upgrade(url)
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    return url


def process_tree(pid: int) -> list[int]:
    """`pid` and its children (gunicorn's master and workers), from /proc."""
    found = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            children = (task / "children").read_text().split()
            for child in children:
                found += process_tree(int(child))
    except OSError:
        pass
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of `pids` so far (Linux /proc; 0 where unreadable)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def mariadb_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in ("mariadbd", "mysqld"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


class CpuMeter:
    """CPU seconds spent per request by the server, the database and this load generator."""

    def __init__(self, server_pid: int) -> None:
        self.groups = {"server": process_tree(server_pid), "database": mariadb_pids()}

    def start(self) -> None:
        self.before = {name: cpu_seconds(pids) for name, pids in self.groups.items()}
        self.before["load"] = time.process_time()

    def per_request(self, requests: int) -> dict[str, float]:
        now = {name: cpu_seconds(pids) for name, pids in self.groups.items()}
        now["load"] = time.process_time()
        return {name: (now[name] - self.before[name]) / max(requests, 1) * 1000 for name in now}


@dataclass
class Phase:
    rate: float
    latencies: list[float]
    codes: Counter
    cpu: dict[str, float]


def measure(meter: CpuMeter, base: str, headers: dict[str, str], args: argparse.Namespace,
            request) -> Phase:  # type: ignore[no-untyped-def]
    meter.start()
    rate, latencies, codes = run_load(base, headers, args.seconds, args.threads, request)
    return Phase(rate, latencies, codes, meter.per_request(len(latencies)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def run_load(base: str, headers: dict[str, str], seconds: float, threads: int,
             request) -> tuple[float, list[float], Counter]:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    codes: Counter = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    counter = itertools.count()

    def worker() -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            while time.monotonic() < stop:
                n = next(counter)
                started = time.perf_counter()
                response = request(client, n)
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    codes[response.status_code] += 1

    began = time.monotonic()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return len(latencies) / (time.monotonic() - began), latencies, codes


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0, help="per phase and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=16, help="load generator threads")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--web-threads", type=int, default=4, help="threads per worker")
    args = parser.parse_args()

    url = prepare_database()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_"))}
    env.update(DATABASE_URL=url, REDIS_URL=REDIS_URL, REDIS_KEY_PREFIX="as-bench")
    token = json.loads(subprocess.run(
        [str(BIN / "auto-session"), "clients", "create", "--name", "bench", "--role", "bot",
         "--json"], env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout)["token"]
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "gunicorn"), "--workers", str(args.workers), "--threads", str(args.web_threads),
         "--bind", f"127.0.0.1:{port}", "--no-control-socket", "app.wsgi:app"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        # warm every worker's pools
        run_load(base, headers, 1.0, args.threads, lambda c, n: c.get("/healthz"))
        run_load(base, headers, 1.0, args.threads, lambda c, n: c.post(
            "/api/v1/sessions", json={"account_id": "warm", "shop_id": f"w{n}",
                                      "session_type": "AUTO_BARGAIN"}))

        meter = CpuMeter(server.pid)
        healthz: list[Phase] = []
        creations: list[Phase] = []
        for round_no in range(args.rounds):
            healthz.append(measure(meter, base, headers, args, lambda c, n: c.get("/healthz")))
            creations.append(measure(
                meter, base, headers, args,
                lambda c, n, r=round_no: c.post("/api/v1/sessions", json={
                    "account_id": "bench", "shop_id": f"shop-{r}-{n}",
                    "session_type": "AUTO_BARGAIN"})))

        # 200 concurrent creations on one slot
        one_lat: list[float] = []
        one_codes: Counter = Counter()
        barrier = threading.Barrier(200)
        lock = threading.Lock()

        def one(n: int) -> None:
            with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
                barrier.wait()
                started = time.perf_counter()
                response = client.post("/api/v1/sessions", json={
                    "account_id": "hot", "shop_id": "one-slot",
                    "session_type": "AUTO_BARGAIN" if n % 2 else "AUTO_FOLLOW_UP"})
                with lock:
                    one_lat.append(time.perf_counter() - started)
                    one_codes[response.status_code] += 1

        pool = [threading.Thread(target=one, args=(n,)) for n in range(200)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            occupants = conn.exec_driver_sql(
                "SELECT COUNT(*) FROM sessions WHERE account_id='hot' AND shop_id='one-slot' "
                "AND status IN ('ACTIVE','TRANSFERRED')").scalar_one()
            statuses = dict(conn.exec_driver_sql(
                "SELECT status, COUNT(*) FROM sessions WHERE account_id='hot' "
                "GROUP BY status").all())
        engine.dispose()
    finally:
        server.terminate()
        server.wait(15)

    print(f"gunicorn {args.workers} workers x {args.web_threads} threads; "
          f"load: {args.threads} threads; {args.rounds} rounds of {args.seconds:.0f} s per "
          "phase (MariaDB + Redis, loopback)")
    ratios = [c.rate / h.rate for h, c in zip(healthz, creations, strict=True)]
    for name, phases in (("GET /healthz  ", healthz), ("POST /sessions", creations)):
        latencies = [x for p in phases for x in p.latencies]
        codes = sum((p.codes for p in phases), Counter())
        rates = "  ".join(f"{p.rate:6.1f}" for p in phases)
        print(f"{name}  req/s by round {rates}  p50 {percentile(latencies, .5):6.1f} ms  "
              f"p99 {percentile(latencies, .99):6.1f} ms  {dict(codes)}")
    for name, phases in (("healthz", healthz), ("creation", creations)):
        cpu = {k: statistics.median(p.cpu[k] for p in phases) for k in phases[0].cpu}
        print(f"CPU per {name:9s}  " + "  ".join(f"{k} {v:.2f} ms" for k, v in cpu.items()))
    print("creations / healthz by round  " + "  ".join(f"{r:.2f}" for r in ratios)
          + f"   median {statistics.median(ratios):.2f}  (aim >= 0.35)")
    print(f"200 on one slot:    occupants {occupants}  statuses {statuses}  codes "
          f"{dict(one_codes)}  p50 {percentile(one_lat, .5):6.1f} ms  "
          f"p99 {percentile(one_lat, .99):6.1f} ms")
    return 0 if occupants == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
