"""What a log line knows about the work it belongs to (SPEC §13 "Logs").

One context variable holds the current work's fields — `trace_id`, and `client_id`,
`session_id`, `job_id`, `task_name`, `task_id` where known. A request binds them at its
start (`app.api.observe`), a Celery task at its start from the headers the request's
publish added (`tasks.observability`); the log formatters read them. Plain Python: the
service layer may bind a field too without importing Flask or Celery.
"""

from __future__ import annotations

import itertools
import os
import secrets
from contextvars import ContextVar, Token
from typing import Any

FIELDS = ("trace_id", "client_id", "session_id", "job_id", "task_name", "task_id")

_work: ContextVar[dict[str, str]] = ContextVar("auto_session_work", default={})  # noqa: B039


_process_prefix = [secrets.token_hex(4)]
_sequence = itertools.count(1)


def _new_process() -> None:
    _process_prefix[0] = secrets.token_hex(4)


os.register_at_fork(after_in_child=_new_process)


def new_trace_id() -> str:
    """A fresh trace id: 16 hex digits (the form problem documents carried already) — a
    random prefix of this process (drawn again in a forked child) and a sequence number:
    unique without asking the OS for randomness on every request."""
    return f"{_process_prefix[0]}{next(_sequence) & 0xFFFFFFFF:08x}"


def current() -> dict[str, str]:
    """The fields bound for the current work (empty outside any)."""
    return _work.get()


def trace_id() -> str | None:
    return _work.get().get("trace_id")


def start(**fields: Any) -> Token[dict[str, str]]:
    """Begin a unit of work with exactly `fields` (None values dropped); `end` with the
    token restores what was bound before (a thread serves many requests)."""
    return _work.set({k: str(v) for k, v in fields.items() if v is not None})


def begin(fields: dict[str, str]) -> None:
    """Begin a unit of work with exactly `fields` (all strings), not to be undone: the
    next unit of work of the thread replaces them (a request; tasks use `start`)."""
    _work.set(fields)


def bind(**fields: Any) -> None:
    """Add fields to the current work (e.g. the client once authenticated); undone by
    the `end` of the work they were bound in."""
    values = {k: str(v) for k, v in fields.items() if v is not None}
    if values:
        _work.set({**_work.get(), **values})


def end(token: Token[dict[str, str]]) -> None:
    _work.reset(token)
