"""The log formats and the redaction, in this process (the real processes' lines:
tests/observability/test_processes.py)."""

from __future__ import annotations

import contextvars
import io
import json
import logging
from collections.abc import Iterator

import pytest

from app.config import ConfigError, load_settings
from app.observability import context, logs

SECRET = "s3cr3t-value-1234567890"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("tests.observability.captured")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, stream, handler
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize(("line", "kept"), [
    ("Authorization: Bearer ast_abcdefghijklmnopqrstuvwxyz", "Authorization:"),
    ("GET /api/v1/sessions?token=abc123&limit=5 HTTP/1.1", "&limit=5 HTTP/1.1"),
    ('{"password": "hunter22", "user": "li"}', '"user": "li"'),
    ("mysql+pymysql://root:pw123456@db:3306/auto_session", "root:"),
    ("webhook secret whsec_0123456789abcdefghij rotated", "rotated"),
    ("LLM_API_KEY=sk-live-xyz LLM_MODEL=gpt", "LLM_MODEL=gpt"),
    ("x-api-key: k-9999 and Cookie: session=abc", "and"),
])
def test_redaction_removes_the_secret_and_keeps_the_rest(line: str, kept: str):
    redacted = logs.redact(line)
    assert "[redacted]" in redacted and kept in redacted
    for secret in ("ast_abcdefghijklmnopqrstuvwxyz", "abc123", "hunter22", "pw123456",
                   "whsec_0123456789abcdefghij", "sk-live-xyz", "k-9999", "session=abc"):
        assert secret not in redacted


def test_configured_secrets_are_redacted_verbatim(tmp_path):
    settings = load_settings(_env_file=None, data_dir=tmp_path, secret_key=SECRET,
                             database_url="mysql+pymysql://app:db-pass-987654@h/x")
    found = logs.configured_secrets(settings)
    assert SECRET in found and "db-pass-987654" in found
    assert logs.redact(f"boot with {SECRET} and db-pass-987654", found).count(
        "[redacted]") == 2


def test_json_lines_carry_the_fields_of_the_current_work(captured, tmp_path):
    logger, stream, handler = captured
    settings = load_settings(_env_file=None, data_dir=tmp_path, log_format="json",
                             secret_key=SECRET)
    handler.setFormatter(logs.Redacting(logs.JsonLines(role="worker"),
                                        logs.configured_secrets(settings)))
    token = context.start(trace_id="0123456789abcdef", client_id="cli_1",
                          session_id="ses_1", task_name="detection.detect")
    try:
        logger.info("judged %s with key %s", "ses_1", SECRET)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        context.end(token)
    contextvars.Context().run(logger.warning, "outside any work")
    first, failed, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "judged ses_1 with key [redacted]"
    assert (first["level"], first["logger"], first["process"]) == (
        "INFO", "tests.observability.captured", "worker")
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert (first["trace_id"], first["client_id"], first["session_id"], first["task_name"]) == (
        "0123456789abcdef", "cli_1", "ses_1", "detection.detect")
    assert "ValueError: boom" in failed["exc_info"]
    assert "trace_id" not in outside


def test_gunicorn_access_lines_carry_the_answers_trace_id(captured):
    logger, stream, handler = captured
    handler.setFormatter(logs.JsonLines(role="web"))
    access = logging.getLogger("gunicorn.access")
    access.addHandler(handler)
    access.propagate = False
    access.setLevel(logging.INFO)
    try:
        access.info('%(h)s "%(r)s" %(s)s', {
            "h": "127.0.0.1", "r": "GET /healthz HTTP/1.1", "s": "200", "m": "GET",
            "U": "/healthz", "D": 1500, "{x-trace-id}o": "feedfacecafebeef"})
    finally:
        access.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["message"] == '127.0.0.1 "GET /healthz HTTP/1.1" 200'
    assert (line["trace_id"], line["method"], line["path"], line["status"],
            line["duration_ms"]) == ("feedfacecafebeef", "GET", "/healthz", 200, 1.5)


def test_text_mode_keeps_a_handlers_own_format_and_redacts_it(captured, tmp_path):
    logger, stream, handler = captured
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    settings = load_settings(_env_file=None, data_dir=tmp_path)
    logs.install(settings, "worker", loggers=(logger.name,))
    logs.install(settings, "worker", loggers=(logger.name,))  # twice: wrapped once
    logger.info("token=%s", "ast_abcdefghijklmnopqrstuvwxyz")
    assert stream.getvalue() == "[INFO] token=[redacted]\n"


@pytest.mark.parametrize(("variable", "value"), [
    ("log_format", "xml"), ("log_level", "LOUD"), ("metrics_token", "short")])
def test_a_bad_metrics_or_log_setting_stops_start_up_naming_it(variable: str, value: str):
    with pytest.raises(ConfigError, match=variable.upper()):
        load_settings(_env_file=None, **{variable: value})


def test_log_settings_are_case_insensitive():
    settings = load_settings(_env_file=None, log_format="JSON", log_level="debug")
    assert (settings.log_format, settings.log_level) == ("json", "DEBUG")
