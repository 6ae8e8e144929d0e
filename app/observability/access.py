"""gunicorn's logger for the `web` process (`gunicorn.conf.py` names it): its lines in
LOG_FORMAT, redacted (`app.observability.logs`), and access lines that cost what their
format uses.

gunicorn builds the access line's atoms from every request header, every answer header
and every WSGI environ variable (`{name}i`, `{name}o`, `{name}e`), about forty keys of
which the format names one or two, then copies them all once more to escape quotes:
half of an access line's cost, on every call. This logger hands gunicorn's own `atoms`
the headers and variables its format names (and the ones gunicorn's fixed atoms read),
so the line comes out the same for any `access_log_format`, with less work.
"""

from __future__ import annotations

import re
from typing import Any

from gunicorn import glogging

# `%({name}i)s`, `%({name}o)s`, `%({name}e)s` in an access-log format
_NAMED = re.compile(r"%\(\{([^}]*)\}([ioe])\)")
# the WSGI variables gunicorn's fixed atoms (h, u, r, m, U, q, H, f, a) read
_FIXED_ENVIRON = ("REMOTE_ADDR", "HTTP_AUTHORIZATION", "REQUEST_METHOD", "RAW_URI",
                  "SERVER_PROTOCOL", "PATH_INFO", "QUERY_STRING", "HTTP_REFERER",
                  "HTTP_USER_AGENT")


class _Headers:
    """A request or an answer, as gunicorn's `atoms` reads it, with fewer headers."""

    __slots__ = ("headers", "status", "sent")

    def __init__(self, headers: list[tuple[str, str]], status: Any = None,
                 sent: Any = None) -> None:
        self.headers = headers
        self.status = status
        self.sent = sent


class GunicornLogger(glogging.Logger):
    """gunicorn's logger, its lines in LOG_FORMAT (set up again on a HUP), its access
    atoms limited to what the access-log format names."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        named = _NAMED.findall(cfg.access_log_format or "")
        self._wanted = {kind: frozenset(name.lower() for name, k in named if k == kind)
                        for kind in "ioe"}
        # the JSON lines' trace_id (`logs._access_fields`), whatever the format says
        self._wanted["o"] |= {"x-trace-id"}
        try:
            from app.config import load_settings

            settings = load_settings()
        except Exception:  # a bad setting: the workers report it with its message
            return
        from app.observability import logs

        logs.install(settings, "web", loggers=("gunicorn.error", "gunicorn.access"))

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        wanted = self._wanted  # set by `setup`, which gunicorn's Logger.__init__ calls
        request_headers = getattr(req, "headers", req)
        if hasattr(request_headers, "items"):
            request_headers = request_headers.items()
        answer_headers = resp.headers.items() if hasattr(resp.headers, "items") else resp.headers
        variables = {key: environ[key] for key in _FIXED_ENVIRON if key in environ}
        if wanted["e"]:
            variables.update((k, v) for k, v in environ.items() if k.lower() in wanted["e"])
        return super().atoms(
            _Headers([(k, v) for k, v in answer_headers if k.lower() in wanted["o"]],
                     resp.status, getattr(resp, "sent", None)),
            _Headers([(k, v) for k, v in request_headers if k.lower() in wanted["i"]]),
            variables, request_time)
