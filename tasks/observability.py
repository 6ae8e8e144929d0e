"""Metrics, logs and trace ids of the Celery processes (SPEC §13).

- The worker (`celeryd_init`, in its main process before the pool forks) writes its
  metrics under METRICS_DIR/worker, cleaned at its start; each pool process counts
  itself alive and drops its live gauges when it ends. The web's `/metrics` merges them.
- Worker and beat log with LOG_FORMAT (Celery's handlers get our formatter once Celery
  has set them up), secrets redacted; in JSON mode the worker's banner is not printed
  (every line of its output is then one JSON object).
- A task published while a request (or another task) runs carries its `trace_id` and
  `client_id` as message headers (`before_task_publish`); the task binds them for its
  log lines (`task_prerun`), with its name, id and, for an import, the `job_id`. A task
  nobody traced (a beat run) gets a trace id of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
from contextvars import Token
from typing import Any

from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    before_task_publish,
    celeryd_init,
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_process_shutdown,
)

from app.config import get_settings
from app.observability import context, logs
from app.observability.processes import forget_process, metrics_root, use_metrics_dir

PROPAGATED = ("trace_id", "client_id")

_role = {"name": "beat"}  # the worker says so in celeryd_init, before logging is set up
_open_work: dict[str, Token[dict[str, str]]] = {}


@celeryd_init.connect
def _worker_starting(instance: Any = None, **_kwargs: Any) -> None:
    _role["name"] = "worker"
    settings = get_settings()
    if not settings.embedded:
        use_metrics_dir(metrics_root(settings), "worker", clean=True)
    if settings.log_format == "json":
        # Until Celery sets up its logging: warnings (e.g. "running as root") as JSON too.
        logging.captureWarnings(True)
        logs.install(settings, "worker", root_handler=True)
        if instance is not None:
            instance.quiet = True  # no multi-line banner among the JSON lines


@worker_process_init.connect
def _pool_process_started(**_kwargs: Any) -> None:
    from app.observability.metrics import process_started

    process_started("worker")


@worker_process_shutdown.connect
def _pool_process_ending(**_kwargs: Any) -> None:
    forget_process(os.getpid())


@after_setup_logger.connect
@after_setup_task_logger.connect
def _format_logs(logger: Any = None, **_kwargs: Any) -> None:
    names = (logger.name,) if logger is not None else ()
    logs.install(get_settings(), _role["name"], loggers=names)


@before_task_publish.connect
def _carry_trace(headers: dict[str, Any] | None = None, **_kwargs: Any) -> None:
    if headers is None:
        return
    work = context.current()
    for name in PROPAGATED:
        if name in work and name not in headers:
            headers[name] = work[name]


@task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, args: Any = None,
               kwargs: Any = None, **_kwargs: Any) -> None:
    if task is None or task_id is None:
        return
    request = task.request
    fields: dict[str, Any] = {
        "trace_id": (getattr(request, "trace_id", None) or context.trace_id()
                     or context.new_trace_id()),
        "client_id": getattr(request, "client_id", None) or context.current().get("client_id"),
        "task_name": task.name,
        "task_id": task_id,
        "job_id": _job_id(task.name, args, kwargs),
    }
    _open_work[task_id] = context.start(**fields)


@task_postrun.connect
def _unbind_task(task_id: str | None = None, **_kwargs: Any) -> None:
    token = _open_work.pop(task_id or "", None)
    if token is not None:
        # set in another context (cannot happen in a worker): leave it
        with contextlib.suppress(ValueError):
            context.end(token)


def _job_id(name: str, args: Any, kwargs: Any) -> str | None:
    if isinstance(kwargs, dict) and kwargs.get("job_id"):
        return str(kwargs["job_id"])
    if name.startswith("imports.") and args:
        return str(args[0])
    return None
