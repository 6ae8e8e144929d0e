"""gunicorn's access lines through our logger (`app.observability.access`): the same line
as gunicorn's own logger writes, for any access-log format, built from fewer atoms."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from gunicorn import glogging
from gunicorn.config import Config

from app.observability.access import GunicornLogger

SHIPPED = ('%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" '
           'trace_id=%({x-trace-id}o)s')


class _Answer:
    def __init__(self) -> None:
        self.status = "201 CREATED"
        self.sent = 612
        self.headers = [("Content-Type", "application/json"), ("X-Trace-Id", "4bf92f35"),
                        ("Vary", "Accept")]


class _Request:
    headers = [("HOST", "127.0.0.1:8000"), ("USER-AGENT", 'bot "v1"'),
               ("X-REQUEST-ID", "req-7"), ("AUTHORIZATION", "Basic dXNlcjpwdw==")]


ENVIRON = {
    "REMOTE_ADDR": "10.0.0.9", "REQUEST_METHOD": "POST",
    "RAW_URI": "/api/v1/sessions/abc/heartbeat?x=1", "SERVER_PROTOCOL": "HTTP/1.1",
    "PATH_INFO": "/api/v1/sessions/abc/heartbeat", "QUERY_STRING": "x=1",
    "HTTP_USER_AGENT": 'bot "v1"', "HTTP_AUTHORIZATION": "Basic dXNlcjpwdw==",
    "HTTP_X_REQUEST_ID": "req-7", "SERVER_NAME": "web-1", "wsgi.url_scheme": "http",
}


def _line(logger_class: type[glogging.Logger], log_format: str) -> tuple[str, dict[str, Any]]:
    cfg = Config()
    cfg.set("access_log_format", log_format)
    logger = logger_class(cfg)
    logger.now = lambda: "[06/Dec/2026:00:05:01 +0000]"  # type: ignore[method-assign]
    atoms = logger.atoms(_Answer(), _Request(), ENVIRON, dt.timedelta(microseconds=3210))
    return log_format % glogging.SafeAtoms(atoms), atoms


@pytest.mark.parametrize("log_format", [
    SHIPPED,
    Config().access_log_format,  # gunicorn's default
    '%(h)s "%(r)s" %(s)s %(D)s %(M)s %(L)s %(p)s %(q)s %(U)s %(m)s %(H)s %(B)s %(T)s',
    '%({x-request-id}i)s %({X-Request-Id}i)s %({host}i)s %({missing}i)s %({vary}o)s '
    '%({content-type}o)s %({server_name}e)s %({wsgi.url_scheme}e)s %({nope}e)s %(u)s',
])
def test_the_access_line_is_gunicorns_own(log_format: str):
    ours, atoms = _line(GunicornLogger, log_format)
    theirs, all_atoms = _line(glogging.Logger, log_format)
    assert ours == theirs
    assert "-" not in ours.split()[:1]  # the line was filled in, not blank atoms
    assert len(atoms) < len(all_atoms)  # and from fewer atoms


def test_json_lines_keep_the_trace_id_whatever_the_format():
    _, atoms = _line(GunicornLogger, "%(h)s %(s)s")
    assert atoms["{x-trace-id}o"] == "4bf92f35"
    assert {"m", "U", "s", "D", "h"} <= set(atoms)  # what `logs._access_fields` reads
