"""Request budgets per client and failed authentications per address (SPEC §8 "Rate limits").

Two limits, both fixed windows counted by `limits` (the engine under Flask-Limiter):

- every authenticated request costs its client one unit of its role's budget
  (`RATE_LIMIT_BOT`, `RATE_LIMIT_DESK`, `RATE_LIMIT_ADMIN`), keyed by the client id — so
  the check runs right after authentication (`app.api.auth.authenticate`, and the
  console's cookie check in `admin.auth`), and the open endpoints (`/healthz`,
  `/readyz`, `/openapi.json`, `/docs`, static files) are never counted;
- every failed authentication (a missing, unknown or revoked token on the API, a bad
  token on the console's log-in) costs its remote address one unit of
  `RATE_LIMIT_AUTH_FAILURES`. Past it, failures answer 429 instead of 401; a valid
  token still passes (so one noisy neighbour behind a shared address cannot lock the
  others out, and a 256-bit token is not guessable anyway).

Past a limit the answer is `429 /problems/rate-limited` with `Retry-After` (the seconds
until the window ends) and a detail naming the limit and its setting.

Cost: a client's budget is taken from Redis in leases of 1/`LEASE_SHARE` of it (at
least one request): one round trip (`limits`' INCR + EXPIRE Lua script, by the lease's
size) per lease, and the lease is spent in this process without Redis until it is used
up or its window (the budget's period) has passed. So at the shipped
`RATE_LIMIT_BOT=500/second` a web process asks Redis once every 25 requests of a client
(at 1/100, a lease of 5, the round trip was ~40 µs of every bot request's ~750 µs of web
CPU, measured under wrk: a tenth of what a GET costs above a healthz); a budget under
`LEASE_SHARE` per window is still counted request by request. The
enforced limit is exact to within one lease per web process: a process may spend a
lease taken at the end of a window early in the next (at most one lease more per
process per window), and a lease refused at the end of the budget spends what it asked
for (the client is refused up to one lease early). Failed authentications are counted
one by one; the open endpoints not at all. Flask-Limiter's extension object is not installed: its
request hooks cost ~20 µs on every request, exempt or not, and its check runs before
the view, i.e. before the client is known. The counters live in Redis under
`<REDIS_KEY_PREFIX>:ratelimit:` when Redis is configured (shared by every web process),
in process memory on the embedded default. When Redis fails, the limiter fails open:
the request is served uncounted (a warning is logged) and the limiter leaves Redis
alone for `STORAGE_RETRY_SECONDS`; the slot operations answer their own 503 anyway.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import redis
from flask import Flask, Response, current_app, request
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.strategies import FixedWindowRateLimiter

from app.api.http import runtime
from app.api.problems import render_domain_error
from app.clients.service import ClientIdentity, ClientRole
from app.config import Settings
from app.errors import RateLimited
from app.observability.metrics import RATE_LIMITED
from app.runtime import Runtime

log = logging.getLogger(__name__)

LIMITS_KEY = "auto_session.rate_limits"
STORAGE_RETRY_SECONDS = 2.0
ROLE_SETTINGS = {
    ClientRole.BOT: "rate_limit_bot",
    ClientRole.DESK: "rate_limit_desk",
    ClientRole.ADMIN: "rate_limit_admin",
}
AUTH_FAILURES_SETTING = "rate_limit_auth_failures"
LEASE_SHARE = 20  # a process takes a client's budget 1/20 of it at a time
MAX_LEASES = 4096  # clients with a lease in this process before expired ones are dropped


def render_rate_limited(exc: RateLimited) -> Response:
    """The 429 problem, with `Retry-After` set to the end of the spent window."""
    response = render_domain_error(exc)
    response.headers["Retry-After"] = str(exc.retry_after)
    return response


@dataclass(frozen=True)
class Budget:
    """One configured limit: parsed, and the text and setting it came from (for the 429)."""

    item: RateLimitItem
    text: str
    setting: str

    @classmethod
    def from_settings(cls, settings: Settings, name: str) -> Budget:
        text = str(getattr(settings, name))
        return cls(item=parse(text), text=text, setting=name.upper())


class RateLimits:
    """The limits of one app on one runtime: budgets by role, the auth-failure limit, and
    where their counters live."""

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        self.runtime = runtime
        self.enabled = settings.rate_limit_enabled
        self.by_role = {str(role): Budget.from_settings(settings, name)
                        for role, name in ROLE_SETTINGS.items()}
        self.auth_failures = Budget.from_settings(settings, AUTH_FAILURES_SETTING)
        storage: Storage
        if runtime.redis is not None and settings.redis_url:
            storage = RedisStorage(settings.redis_url,
                                   connection_pool=runtime.redis.connection_pool,
                                   key_prefix=f"{settings.redis_key_prefix}:ratelimit")
        else:
            storage = MemoryStorage()
        self.storage = storage
        self.counter = FixedWindowRateLimiter(storage)
        self._skip_storage_until = 0.0  # monotonic; set when the storage failed
        # client id -> [requests left in the lease, monotonic time it lapses]
        self._leases: dict[str, list[float]] = {}
        self._leases_guard = threading.Lock()

    def charge_client(self, client: ClientIdentity) -> None:
        """Count one request against the client's role budget; `RateLimited` past it."""
        if not self.enabled:
            return
        client_id = client.client_id
        now = time.monotonic()
        with self._leases_guard:
            lease = self._leases.get(client_id)
            if lease is not None and lease[0] >= 1 and lease[1] > now:
                lease[0] -= 1
                return
        budget = self.by_role[str(client.role)]
        size = max(1, budget.item.amount // LEASE_SHARE)
        self._spend(budget, ("client", client_id),
                    f"client {client_id} ({client.role}) spent its budget", cost=size)
        if size > 1:
            with self._leases_guard:
                if len(self._leases) >= MAX_LEASES:
                    self._leases = {k: v for k, v in self._leases.items() if v[1] > now}
                self._leases[client_id] = [size - 1, now + budget.item.get_expiry()]

    def count_failed_authentication(self, address: str) -> None:
        """Count one failed authentication from `address`; `RateLimited` past the limit
        (the caller answers its 401 otherwise)."""
        if not self.enabled:
            return
        self._spend(self.auth_failures, ("auth-failures", address),
                    f"too many failed authentications from {address}")

    def _spend(self, budget: Budget, identifiers: tuple[str, ...], what: str, *,
               cost: int = 1) -> None:
        if time.monotonic() < self._skip_storage_until:
            return
        try:
            if self.counter.hit(budget.item, *identifiers, cost=cost):
                return
            ends_at = self.storage.get_expiry(budget.item.key_for(*identifiers))
        except redis.RedisError as exc:
            self._skip_storage_until = time.monotonic() + STORAGE_RETRY_SECONDS
            log.warning("rate limit counters unreachable (%s): serving requests uncounted "
                        "for %.0f s", exc.__class__.__name__, STORAGE_RETRY_SECONDS)
            return
        retry_after = max(1, math.ceil(ends_at - time.time()))
        RATE_LIMITED.labels(budget.setting).inc()
        raise RateLimited(
            f"{what}: {budget.text} ({budget.setting}); retry in {retry_after} s",
            limit=budget.text, setting=budget.setting, retry_after=retry_after,
        )


_build_lock = threading.Lock()


def rate_limits() -> RateLimits:
    """The current app's limits, built on first use for its runtime (and again if a test
    attaches another runtime to the app)."""
    rt = runtime()
    current: RateLimits | None = current_app.extensions.get(LIMITS_KEY)
    if current is not None and current.runtime is rt:
        return current
    with _build_lock:
        current = current_app.extensions.get(LIMITS_KEY)
        if current is None or current.runtime is not rt:
            current = RateLimits(rt)
            current_app.extensions[LIMITS_KEY] = current
        return current


def charge_client(client: ClientIdentity) -> None:
    """Count this request against `client`'s budget (call right after authenticating)."""
    rate_limits().charge_client(client)


def count_failed_authentication() -> None:
    """Count this request's failed authentication against its remote address."""
    rate_limits().count_failed_authentication(request.remote_addr or "unknown")


def init_app(app: Flask) -> None:
    """Render `RateLimited` with its `Retry-After` (the factory calls this once)."""
    app.register_error_handler(RateLimited, render_rate_limited)
