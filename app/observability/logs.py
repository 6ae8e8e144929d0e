"""Log lines of the web, worker and beat processes (SPEC §13 "Logs").

`LOG_FORMAT=text` (the default) keeps human-readable lines; `LOG_FORMAT=json` writes one
JSON object a line: `time` (UTC, ISO 8601), `level`, `logger`, `message`, `trace_id`
and, where known, `client_id`, `session_id`, `job_id`, `task_name`, `task_id` (from
`app.observability.context`), plus `exc_info` for an exception. gunicorn's access lines
carry the request's `trace_id` (its `X-Trace-Id` answer header), `method`, `path`,
`status` and `duration_ms`.

Whatever the format, every line goes through `redact`: API tokens (`ast_…`), webhook
secrets (`whsec_…`), bearer credentials, `password=`/`token=`/`api_key=`-like pairs,
a URL's password and the configured secrets themselves (SECRET_KEY, METRICS_TOKEN,
LLM_API_KEY, the database password) become `[redacted]` — a line never carries one,
whoever wrote it (our code, SQLAlchemy's parameters in an error, a library).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from pythonjsonlogger.json import JsonFormatter

from app.observability import context

REDACTED = "[redacted]"
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(ast|whsec)_[A-Za-z0-9_\-]{8,}"), rf"\1_{REDACTED}"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[^\s\"'\\,;]+"), rf"\1 {REDACTED}"),
    # A key name ending in one of the words, then its value. Tried at the start of a
    # word only (the look-behind): the leftmost match starts there anyway, and trying
    # every position inside a long word (a hex id) made this pattern quadratic — 200 µs
    # on one 540-character JSON access line.
    (re.compile(r"(?i)((?<![\w\-])[\w\-]*(?:password|passwd|secret|token|api[_\-]?key"
                r"|authorization|cookie)[\w\-]*[\"']?\s*[:=]\s*[\"']?)(?!\[redacted\])"
                r"[^\s\"'\\,;&]+"),
     rf"\1{REDACTED}"),
    (re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^\s:/@\"']*:)[^\s@/\"']+@"), rf"\1{REDACTED}@"),
)
# What each pattern cannot match without (lower case): a line holding none of these —
# most lines, every access line of a robot's call — is left as it is without running the
# patterns. The patterns ignore case the way `re` does, which also matches "ſ" to "s",
# "K" (Kelvin) to "k" and "İ", "ı" to "i": the line is folded the same way before the test
# (`tests/observability/test_logs.py` pins the fold against `re`).
_NEEDED = ("ast_", "whsec_", "bearer", "basic", "passw", "secret", "token", "apikey",
           "api_key", "api-key", "authorization", "cookie", "://")
_FOLD = str.maketrans({"ſ": "s", "\u212a": "k", "İ": "i", "ı": "i"})
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(trace)s: %(message)s"


def may_hold_secret(text: str) -> bool:
    """Whether any of the redaction patterns could match `text` (a cheap test)."""
    folded = (text if text.isascii() else text.translate(_FOLD)).lower()
    return any(needle in folded for needle in _NEEDED)


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    if not may_hold_secret(text):
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def configured_secrets(settings: Any) -> tuple[str, ...]:
    """The secret values of the settings, longest first (at least 6 characters: a short
    one would blank out ordinary words)."""
    values = [getattr(settings, name, None) for name in
              ("secret_key", "metrics_token", "llm_api_key", "database_password")]
    for name in ("database_url", "redis_url"):
        url = getattr(settings, name, None)
        if url:
            with contextlib.suppress(ValueError):
                values.append(urlsplit(url).password)
    found = {v for v in values if isinstance(v, str) and len(v) >= 6}
    return tuple(sorted(found, key=len, reverse=True))


class Redacting(logging.Formatter):
    """Any formatter, with `redact` applied to what it wrote."""

    def __init__(self, inner: logging.Formatter, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self.inner = inner
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record), self.secrets)


class TextLines(logging.Formatter):
    """The human-readable line, with the trace id when there is one."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        trace = context.current().get("trace_id")
        record.trace = f" [{trace}]" if trace else ""
        return super().format(record)


class JsonLines(JsonFormatter):
    """One JSON object a line with the fields of SPEC §13."""

    def __init__(self, *, role: str) -> None:
        super().__init__(json_ensure_ascii=False)
        self.role = role

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord,
                   message_dict: dict[str, Any]) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, UTC).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["message"] = record.message
        log_data["process"] = self.role
        log_data["pid"] = record.process
        log_data.update(context.current())
        if record.name == "gunicorn.access" and isinstance(record.args, dict):
            log_data.update(_access_fields(record.args))
        super().add_fields(log_data, record, message_dict)


def _access_fields(atoms: dict[str, Any]) -> dict[str, Any]:
    """gunicorn's access-log atoms: the answer's trace id and the request's outline."""
    fields: dict[str, Any] = {"method": atoms.get("m"), "path": atoms.get("U"),
                              "status": _int(atoms.get("s")),
                              "duration_ms": round(_int(atoms.get("D")) / 1000, 3),
                              "remote_addr": atoms.get("h")}
    trace_id = atoms.get("{x-trace-id}o")
    if trace_id and trace_id != "-":
        fields["trace_id"] = trace_id
    return fields


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def install(settings: Any, role: str, *, loggers: tuple[str, ...] = (),
            root_handler: bool = False) -> None:
    """Give every handler of the root logger and of `loggers` this process's format:
    JSON lines, or (text) the handler's own format — gunicorn's, Celery's — or ours if
    it has none; redacted either way. `root_handler`: first give the root logger a
    stderr handler at LOG_LEVEL if it has none (the web's app lines)."""
    secrets = configured_secrets(settings)
    root = logging.getLogger()
    if root_handler and not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
        root.setLevel(settings.log_level)
    for logger in (root, *(logging.getLogger(name) for name in loggers)):
        for handler in logger.handlers:
            current = handler.formatter
            if settings.log_format == "json":
                inner: logging.Formatter = JsonLines(role=role)
            elif isinstance(current, Redacting):
                continue
            else:
                inner = current or TextLines()
            handler.setFormatter(Redacting(inner, secrets))
