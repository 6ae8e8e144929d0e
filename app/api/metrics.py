"""`GET /metrics`: the Prometheus text format, merged over the Procfile's processes.

Who may scrape (SPEC §13): any caller on the loopback interface; anyone else with
`Authorization: Bearer <METRICS_TOKEN>`. Without a METRICS_TOKEN a non-loopback caller
gets 404 (the endpoint does not exist for it); with one, a missing or wrong token is a
401 and counts as a failed authentication of its address (`RATE_LIMIT_AUTH_FAILURES`).
`METRICS_ENABLED=false` answers 404 to everyone.

"Loopback" is the client as PROXY_HOPS trusted proxies reported it (ProxyFix). With
PROXY_HOPS=0 a request carrying forwarding headers is not treated as loopback, so a
reverse proxy on the same machine does not open the endpoint to the world.
"""

from __future__ import annotations

import hmac
import ipaddress

from flask import Blueprint, Response, request
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from app.api.auth import bearer_token
from app.api.http import runtime
from app.api.ratelimit import count_failed_authentication
from app.config import Settings
from app.errors import NotFound, Unauthorized
from app.observability.metrics import exposition

bp = Blueprint("metrics", __name__)
FORWARDING_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


def is_loopback_caller(settings: Settings) -> bool:
    """The direct caller is on loopback and did not come through an untrusted proxy."""
    try:
        address = ipaddress.ip_address((request.remote_addr or "").split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if not address.is_loopback:
        return False
    return not (settings.proxy_hops == 0 and any(h in request.headers for h in FORWARDING_HEADERS))


def check_scraper(settings: Settings) -> None:
    """Raise NotFound or Unauthorized unless this caller may read the metrics."""
    if not settings.metrics_enabled:
        raise NotFound("metrics are disabled (METRICS_ENABLED=false)")
    if is_loopback_caller(settings):
        return
    expected = settings.metrics_token
    if not expected:
        raise NotFound("not found")
    given = bearer_token()
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        count_failed_authentication()
        raise Unauthorized("send METRICS_TOKEN as 'Authorization: Bearer <token>'")


@bp.get("/metrics")
def metrics() -> Response:
    rt = runtime()
    check_scraper(rt.settings)
    return Response(exposition(rt.database), content_type=CONTENT_TYPE_LATEST,
                    headers={"Cache-Control": "no-store"})
