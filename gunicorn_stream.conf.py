"""gunicorn settings of the Procfile's `stream` process (`--config gunicorn_stream.conf.py`).

- `worker_class`: gevent — each stream is a greenlet parked on the process's one
  outbox poller (`app.events.stream.EventHub`), not a thread;
- `workers`: `STREAM_WORKERS`, else 1 — a waiting stream costs no CPU, and each worker
  runs its own poller;
- `worker_connections`: STREAM_MAX_CONNECTIONS plus room to answer the ones past it (503);
- `bind`: STREAM_PORT (8001) unless `--bind` is given;
- `graceful_timeout`: short, since a stream never ends by itself (its clients reconnect
  with their Last-Event-ID).
"""

from __future__ import annotations

import os

from app.config import ConfigError, load_settings

try:
    _settings = load_settings()
except ConfigError as exc:
    raise SystemExit(str(exc)) from None

_workers = os.environ.get("STREAM_WORKERS", "1").strip() or "1"
if not _workers.isdigit() or int(_workers) < 1:
    raise SystemExit(f"invalid configuration: STREAM_WORKERS: must be a positive integer, "
                     f"got {_workers!r}")

worker_class = "gevent"
workers = int(_workers)
worker_connections = _settings.stream_max_connections + 100
bind = [f"0.0.0.0:{_settings.stream_port}"]
graceful_timeout = 5
keepalive = 75


def post_worker_init(worker) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM ends the streams at once (their clients resume elsewhere with their
    Last-Event-ID) instead of after `graceful_timeout`."""
    from app.events.stream import end_streams_on_sigterm

    end_streams_on_sigterm()
