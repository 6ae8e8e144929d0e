"""gunicorn settings of the Procfile's `web` process, sized from the machine.

gunicorn reads `./gunicorn.conf.py` by default (`gunicorn --help`: `-c CONFIG …
[./gunicorn.conf.py]`); a flag on the command line still wins over anything here, so
`gunicorn --workers 2 --threads 4 …` (the tests, `auto-session serve`) is unaffected.

- `workers`: `WEB_CONCURRENCY`, else one process per core available to this process
  (CPU affinity and a cgroup v2 CPU quota honoured), at least 2 — a request is mostly
  CPU in Python, so more processes than cores only add context switches and memory;
- `threads`: `WEB_THREADS`, else THREADS_PER_WORKER (2) — a thread waits on MariaDB and
  Redis for part of each request, so a second one per process keeps the core busy, while
  more only queue behind the GIL and lengthen the tail. Measured on 2 cores with
  `python -m tests.benchmarks.bench_hotpaths --sizes 2x2,2x4,4x2,3x2` (two runs, 32
  paired path x round measurements per size and connection count): 2x2 had the lowest
  p99 at 4 and at 16 connections (0.79x and 0.83x the mean of the four sizes) with a CPU
  per request within 3% of the best; 4 processes cost more CPU per request, 4 threads a
  longer tail at 16 connections (README "Benchmarks", docs/benchmarks-history.md);
- `reuse_port` when there is more than one worker: a listening socket per worker, the
  kernel spreading new connections over them (one shared socket let the first-woken
  worker take every pending connection: all of a client's keep-alive connections on one
  worker, the others idle);
- on the embedded default (no Redis: SQLite and in-process locks and beat) one process
  with 8 threads, as `auto-session serve` does — several processes would each run the
  in-process beat and could not share the in-process slot locks.

Metrics and logs (README "Metrics and logs"): with Redis configured the workers write
their samples under METRICS_DIR/web (cleaned as the server starts, a dead worker's live
gauges dropped), so `/metrics` adds up every worker and the Celery worker's processes;
LOG_FORMAT applies to gunicorn's own lines too.
"""

from __future__ import annotations

import math
import os

THREADS_PER_WORKER = 2
MIN_WORKERS = 2
EMBEDDED_THREADS = 8


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def setting(name: str, default: int) -> int:
    """A positive integer from the environment, else `default`; a bad value stops the
    start with a message naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise SystemExit(f"invalid configuration: {name}: must be a positive integer, "
                         f"got {raw!r}")
    return value


def embedded() -> bool:
    """True on the embedded default (no Redis: tasks, locks and beat in-process)."""
    try:
        from app.config import load_settings

        return load_settings().embedded
    except Exception:  # a bad setting: let the workers report it with its message
        return False


# The default access line, and the answer's trace id (`X-Trace-Id`) to find its log lines.
access_log_format = ('%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" '
                     'trace_id=%({x-trace-id}o)s')

CORES = available_cores()
if embedded():
    workers = setting("WEB_CONCURRENCY", 1)
    threads = setting("WEB_THREADS", EMBEDDED_THREADS)
else:
    workers = setting("WEB_CONCURRENCY", max(MIN_WORKERS, CORES))
    threads = setting("WEB_THREADS", THREADS_PER_WORKER)


# Each worker listens on a socket of its own (SO_REUSEPORT) and the kernel spreads new
# connections over them. On one shared socket, the worker that wakes first accepts every
# connection pending at that moment: a client that opens its keep-alive connections at
# once (a load balancer's pool, wrk) could land them all on one worker, which then served
# them for their lifetime while the other workers idled — seen in 3 of 12 runs of 16
# connections on 2 workers: half the throughput, ~1.5x the CPU a request. The price: a
# connection still queued in an exiting worker's own backlog is reset (the client
# retries). One process (the embedded default) keeps the single socket.
reuse_port = workers > 1

# gunicorn's lines in LOG_FORMAT, redacted; access lines that build only the atoms the
# format above names
logger_class = "app.observability.access.GunicornLogger"


def on_starting(server) -> None:  # type: ignore[no-untyped-def]
    settings = _settings()
    if settings is not None and not settings.embedded:
        from app.observability.processes import metrics_root, use_metrics_dir

        use_metrics_dir(metrics_root(settings), "web", clean=True)
    server.log.info("sizing: %d workers x %d threads (%d cores available; override with "
                    "WEB_CONCURRENCY, WEB_THREADS)", server.cfg.workers, server.cfg.threads,
                    CORES)


def child_exit(server, worker) -> None:  # type: ignore[no-untyped-def]
    from app.observability.processes import forget_process

    forget_process(worker.pid)


def _settings():  # type: ignore[no-untyped-def]
    try:
        from app.config import load_settings

        return load_settings()
    except Exception:  # a bad setting: the workers report it with its message
        return None


def post_worker_init(worker) -> None:  # type: ignore[no-untyped-def]
    """A worker told to stop (SIGTERM) ends its event streams at once instead of waiting
    `graceful_timeout` for them (the embedded default serves streams from this process)."""
    from app.events.stream import end_streams_on_sigterm

    end_streams_on_sigterm()
