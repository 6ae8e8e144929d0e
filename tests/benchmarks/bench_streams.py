"""The API's latency with a thousand live event streams open (SPEC §12), run by hand.

    .venv/bin/python -m tests.benchmarks.bench_streams [--streams 1000] [--rounds 3] \
        [--duration 5] [--connections 16] [--paths get,create] [--json PATH]

The Procfile's `web` and `stream` lines are run as they stand (`sh -c "exec <line>"`,
the app's settings removed from the environment: only DATABASE_URL — a scratch MariaDB
database, created, migrated and dropped here —, REDIS_URL (db 10, flushed), a key prefix,
PORT and STREAM_PORT), exactly as `tests/benchmarks/bench_hotpaths.py` runs `web`, whose
helpers (wrk, its Lua script, the sessions, the bots) this reuses.

Each round measures every path with wrk twice — with no stream open, then with
`--streams` streams open on the `stream` process — the order of the two alternating
from round to round. The streams are held by a separate client process (asyncio, one
socket each, reading and counting every frame), spread over the bench's bot clients, so
the events of the `create` path (one `session.activated` per request) are pushed to the
streams of the bot that made them while wrk measures. Figures: wrk's p99 (and p50) per
path with and without the streams, the ratio taken inside each round, then the median
over the rounds; the aim is ≤ 2×. Also printed: the frames the stream clients received,
and the stream process's CPU during the runs (by /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
# A Redis db of its own (bench_hotpaths flushes db 10): both may run on one machine.
os.environ.setdefault("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.benchmarks.bench_hotpaths import (  # noqa: E402
    REDIS_URL,
    Server,
    admin_sql,
    create_bots,
    ensure_wrk,
    flush_redis,
    free_port,
    log,
    median,
    prepare_database,
    process_tree,
    run_wrk,
    seed_sessions,
    server_env,
)
from tests.benchmarks.floor import stat_cpu  # noqa: E402

DB_NAME = "auto_session_bench_streams"
AIM = 2.0  # p99 with the streams open ÷ p99 without


def procfile_line(kind: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{kind}:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit(f"no {kind}: line in the Procfile")


class StreamServer(Server):
    """The Procfile's `stream` line (Server's start, readiness and stop)."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        self.line = procfile_line("stream")
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.log_file = log_path.open("wb")
        self.proc = subprocess.Popen(["sh", "-c", f"exec {self.line}"], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.log_file)
        self.pid = self.proc.pid

    def cpu(self) -> float:
        return sum(stat_cpu(f"/proc/{pid}/stat") for pid in process_tree(self.pid))


# ---- the stream clients (a process of their own) -------------------------------------------
async def _hold(host: str, port: int, token: str, counts: dict[str, int],
                opened: asyncio.Event, total: int, stop: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write((f"GET /api/v1/events/stream HTTP/1.1\r\nHost: {host}:{port}\r\n"
                  f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n")
                 .encode())
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        counts["refused"] += 1
        writer.close()
        return
    counts["open"] += 1
    if counts["open"] == total:
        opened.set()
    while not stop.is_set():
        chunk = await reader.read(65536)
        if not chunk:
            counts["closed"] += 1
            return
        counts["bytes"] += len(chunk)
        counts["frames"] += chunk.count(b"\nevent: ")


async def _clients(base: str, tokens: list[str], total: int) -> None:
    host, port = base.removeprefix("http://").split(":")
    counts = {"open": 0, "refused": 0, "closed": 0, "bytes": 0, "frames": 0}
    opened, stop = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tasks = []
    for n in range(total):
        tasks.append(asyncio.create_task(
            _hold(host, int(port), tokens[n % len(tokens)], counts, opened, total, stop)))
        if n % 50 == 49:
            await asyncio.sleep(0.05)  # open them in steps, not one SYN flood
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(opened.wait(), 60)
    print(f"READY {json.dumps(counts)}", flush=True)
    report = asyncio.create_task(_report_on_request(counts, stop))
    await stop.wait()
    report.cancel()
    print(f"DONE {json.dumps(counts)}", flush=True)
    for task in tasks:
        task.cancel()


async def _report_on_request(counts: dict[str, int], stop: asyncio.Event) -> None:
    """A line on stdin asks for the counts so far."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            stop.set()
            return
        print(f"COUNTS {json.dumps(counts)}", flush=True)


class StreamClients:
    """`total` open streams, held by a child process running `_clients`."""

    def __init__(self, base: str, tokens_file: Path, total: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.benchmarks.bench_streams", "--hold", base,
             str(tokens_file), str(total)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            raise SystemExit(f"the stream clients did not start: {line!r}")
        self.ready = json.loads(line.split(" ", 1)[1])
        if self.ready["open"] != total:
            self.close()
            raise SystemExit(f"only {self.ready['open']} of {total} streams opened: "
                             f"{self.ready}")

    def cpu(self) -> float:
        return stat_cpu(f"/proc/{self.proc.pid}/stat")

    def counts(self) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("?\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        return dict(json.loads(line.split(" ", 1)[1]))

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()  # its stdin reader ends
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ---- the run -------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--paths", default="get,create")
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--bots", type=int, default=50)
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--database", default=DB_NAME)
    parser.add_argument("--hold", nargs=3, metavar=("BASE", "TOKENS", "N"),
                        help=argparse.SUPPRESS)  # the stream clients' child process
    args = parser.parse_args()
    if args.hold:
        base, tokens_file, total = args.hold
        asyncio.run(_clients(base, Path(tokens_file).read_text().split(), int(total)))
        return 0
    paths = [p for p in args.paths.split(",") if p]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    wrk = ensure_wrk()
    run_id = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    web: Server | None = None
    stream: StreamServer | None = None
    clients: StreamClients | None = None
    load_before = os.getloadavg()
    try:
        log(f"preparing database {args.database} and Redis {REDIS_URL} …")
        flush_redis()
        url = prepare_database(args.database)
        tokens = [token for _, token in create_bots(url, args.bots)]
        web_port, stream_port = free_port(), free_port()
        env = server_env(url, web_port, None)
        env["STREAM_PORT"] = str(stream_port)
        web = Server(env, web_port, workdir / "web.log")
        stream = StreamServer(env, stream_port, workdir / "stream.log")
        web.wait_ready()
        stream.wait_ready()
        log(f"web:    {web.line}\n        {web.sizing()}")
        log(f"stream: {stream.line}")
        log(f"creating {args.sessions} sessions for {args.bots} bots …")
        seeded = seed_sessions(web.base, tokens, args.sessions, f"s{run_id}")
        ids_file = workdir / "sessions.txt"
        ids_file.write_text("".join(f"{sid} {token}\n" for sid, token in seeded))
        tokens_file = workdir / "tokens.txt"
        tokens_file.write_text("\n".join(tokens))
        log("warm-up …")
        for path in paths:
            run_wrk(wrk, web.base, path, ids_file, args.connections, args.wrk_threads, 3,
                    f"w{run_id}{path}")

        rounds: list[dict[str, Any]] = []
        for number in range(args.rounds):
            order = ("without", "with") if number % 2 == 0 else ("with", "without")
            figures: dict[str, Any] = {}
            for state in order:
                if state == "with":
                    log(f"round {number + 1}: opening {args.streams} streams …")
                    clients = StreamClients(stream.base, tokens_file, args.streams)
                    # the stream process is counted in: every stream must be served
                    assert httpx.get(f"{stream.base}/healthz", timeout=5).status_code == 200
                cpu0, counts0 = stream.cpu(), clients.counts() if clients else None
                held0 = clients.cpu() if clients else 0.0
                for path in paths:
                    result = run_wrk(wrk, web.base, path, ids_file, args.connections,
                                     args.wrk_threads, args.duration,
                                     f"r{run_id}{number}{state}{path}")
                    figures[(state, path)] = {
                        "p50_ms": result["latency_us"]["p50"] / 1000,
                        "p99_ms": result["latency_us"]["p99"] / 1000,
                        "rps": result["requests"] / (result["duration_us"] / 1e6),
                        "non_2xx": sum(v for k, v in result["codes"].items()
                                       if not 200 <= int(k) < 300),
                    }
                    got = figures[(state, path)]
                    log(f"  {state:>7} streams  {path:<7} p50 {got['p50_ms']:6.2f} ms  "
                        f"p99 {got['p99_ms']:6.2f} ms  {got['rps']:7.0f} req/s")
                if clients is not None:
                    counts1 = clients.counts()
                    assert counts0 is not None
                    figures[("with", "frames")] = counts1["frames"] - counts0["frames"]
                    figures[("with", "closed")] = counts1["closed"]
                    figures[("with", "stream_cpu_s")] = stream.cpu() - cpu0
                    figures[("with", "clients_cpu_s")] = clients.cpu() - held0
                    clients.close()
                    clients = None
                    time.sleep(2)  # the stream process sees the disconnects
            rounds.append(figures)

        summary: dict[str, Any] = {"streams": args.streams, "connections": args.connections,
                                   "rounds": args.rounds, "duration_s": args.duration,
                                   "cores": len(os.sched_getaffinity(0)),
                                   "load_before": load_before, "paths": {}}
        log("")
        log(f"{'path':<8}{'p99 without':>13}{'p99 with':>11}{'ratio':>8}{'p50 without':>13}"
            f"{'p50 with':>10}   aim ≤ {AIM:g}×")
        verdict = True
        for path in paths:
            ratios = [r[("with", path)]["p99_ms"] / r[("without", path)]["p99_ms"]
                      for r in rounds]
            row = {
                "p99_without_ms": median([r[("without", path)]["p99_ms"] for r in rounds]),
                "p99_with_ms": median([r[("with", path)]["p99_ms"] for r in rounds]),
                "p99_ratio": median(ratios), "p99_ratios": ratios,
                "p50_without_ms": median([r[("without", path)]["p50_ms"] for r in rounds]),
                "p50_with_ms": median([r[("with", path)]["p50_ms"] for r in rounds]),
                "non_2xx": sum(r[(s, path)]["non_2xx"] for r in rounds
                               for s in ("with", "without")),
            }
            summary["paths"][path] = row
            verdict = verdict and row["p99_ratio"] <= AIM
            log(f"{path:<8}{row['p99_without_ms']:>11.2f}ms{row['p99_with_ms']:>9.2f}ms"
                f"{row['p99_ratio']:>7.2f}×{row['p50_without_ms']:>11.2f}ms"
                f"{row['p50_with_ms']:>8.2f}ms   non-2xx {row['non_2xx']}")
        frames = [r[("with", "frames")] for r in rounds]
        cpu = [r[("with", "stream_cpu_s")] for r in rounds]
        summary["frames_per_round"] = frames
        summary["stream_cpu_s_per_round"] = cpu
        held = [r[("with", "clients_cpu_s")] for r in rounds]
        summary["clients_cpu_s_per_round"] = held
        log(f"frames pushed to the {args.streams} streams per round: {frames}; the stream "
            f"process's CPU per round: {[round(c, 2) for c in cpu]} s (the clients': "
            f"{[round(c, 2) for c in held]} s); streams closed by "
            f"the server: {[r[('with', 'closed')] for r in rounds]}")
        log(f"verdict: {'within' if verdict else 'NOT within'} {AIM:g}× on every path")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
        return 0 if verdict else 1
    finally:
        if clients is not None:
            clients.close()
        for server in (stream, web):
            if server is not None:
                server.stop()
        with contextlib.suppress(Exception):
            admin_sql(f"DROP DATABASE IF EXISTS `{args.database}`")
        with contextlib.suppress(Exception):
            flush_redis()


if __name__ == "__main__":
    sys.exit(main())
