"""The log formats and the redaction, in this process (the real processes' lines:
tests/observability/test_processes.py)."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    ("sent Basic dXNlcjpwYXNz upstream", "upstream"),
    ("sent bearer k-9999 upstream", "upstream"),
    ("refresh_token=abc123 ok", "ok"),
    ("the cookie: session=abc end", "end"),
])
def test_redaction_removes_the_secret_and_keeps_the_rest(line: str, kept: str):
    redacted = logs.redact(line)
    assert "[redacted]" in redacted and kept in redacted
    for secret in ("ast_abcdefghijklmnopqrstuvwxyz", "abc123", "hunter22", "pw123456",
                   "whsec_0123456789abcdefghij", "sk-live-xyz", "k-9999", "session=abc",
                   "dXNlcjpwYXNz"):
        assert secret not in redacted


# The patterns as they stood before the cheap pre-test and the word-start anchor: the
# reference the fast `redact` must agree with, on any line.
_REFERENCE = (
    logs._PATTERNS[0], logs._PATTERNS[1],
    (re.compile(r"(?i)([\w\-]*(?:password|passwd|secret|token|api[_\-]?key|authorization"
                r"|cookie)[\w\-]*[\"']?\s*[:=]\s*[\"']?)(?!\[redacted\])[^\s\"'\\,;&]+"),
     logs._PATTERNS[2][1]),
    logs._PATTERNS[3],
)


def _reference_redact(text: str) -> str:
    for pattern, replacement in _REFERENCE:
        text = pattern.sub(replacement, text)
    return text


_KEYS = ["password", "PassWd", "paſsword", "ſecret", "api_\u212aey", "AUTHORİZATİON",
         "authorızation", "tokEn", "x-api-key", "apikey", "Cookie", "bearer", "BASIC",
         "db_password", "refresh_token", "Set-Cookie"]
_FRAGMENTS = st.sampled_from([
    *_KEYS, "ast_", "whsec_", "ast_abcdefgh1234", "whsec_0123456789ab", "mysql://u:p@h/db",
    "redis://:pw@h:6379/0", "://", ":", "=", " = ", '"', "'", " ", "\t", ",", ";", "&", "-",
    "_", "/", "@", "[redacted]", "0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e", "value", "ſ", "İ", "ı",
    "\u212a", "é", "客服",
])
# a key, a separator and a value: what the patterns are for
_ASSIGNMENTS = st.tuples(
    st.sampled_from(["", "x-", "my_", "-"]), st.sampled_from(_KEYS),
    st.sampled_from([":", "=", " = ", '": "', "'='", ": ", " "]),
    st.sampled_from(["abc123", "[redacted]", "s3cr3t&next=1", "", "k-9999,", "客服"]),
).map("".join)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(_ASSIGNMENTS, _FRAGMENTS, st.text(max_size=6)), max_size=12)
       .map("".join))
def test_redaction_agrees_with_the_plain_patterns_on_any_line(line: str):
    """The pre-test (`may_hold_secret`) and the word-start anchor only save time: every
    line comes out exactly as the four patterns, run in full, would leave it."""
    assert logs.redact(line) == _reference_redact(line)


def test_the_pre_test_folds_case_as_re_does():
    """Every character that `re` matches to a letter of the needed words when ignoring
    case (ſ, K, İ, ı …) is folded to that letter by the pre-test: none can hide a key."""
    letters = sorted({c for needle in logs._NEEDED for c in needle if c.isalpha()})
    candidates = [chr(cp) for cp in range(0x80, 0x110000)
                  if any(c.isascii() and c.isalpha()
                         for c in chr(cp).lower() + chr(cp).upper() + chr(cp).casefold())]
    exotic = {}
    for letter in letters:
        pattern = re.compile(letter, re.IGNORECASE)
        for char in candidates:
            if pattern.fullmatch(char):
                exotic.setdefault(letter, []).append(char)
    assert exotic, "re matches some non-ASCII characters to ASCII letters (ſ, K …)"
    for letter, chars in exotic.items():
        for needle in (n for n in logs._NEEDED if letter in n):
            for char in chars:
                spelled = needle.replace(letter, char)
                assert logs.may_hold_secret(f"x {spelled} y"), (needle, char)


def test_an_ordinary_access_line_is_left_as_it_is():
    line = ('127.0.0.1 - - [06/Dec/2026:00:05:01 +0000] "POST /api/v1/sessions/'
            '0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e/heartbeat HTTP/1.1" 200 612 "-" "-"')
    assert not logs.may_hold_secret(line)
    assert logs.redact(line) == line


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
