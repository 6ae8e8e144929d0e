"""Webhook signatures: HMAC-SHA256 over "<timestamp>.<body>" with the client's secret.

Signing the timestamp with the body lets a receiver reject replays: it checks the
signature, refuses a timestamp too far from its clock, and remembers delivery ids
it has already processed (a retry carries the same delivery id).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

SIGNATURE_HEADER = "X-AutoSession-Signature"
TIMESTAMP_HEADER = "X-AutoSession-Timestamp"
DELIVERY_HEADER = "X-AutoSession-Delivery"
EVENT_HEADER = "X-AutoSession-Event"
ATTEMPT_HEADER = "X-AutoSession-Attempt"
SCHEME = "sha256="
DEFAULT_TOLERANCE = 300


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value for `body` sent at `timestamp` (Unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return SCHEME + mac.hexdigest()


def verify(
    secret: str,
    *,
    timestamp: str | int,
    body: bytes,
    signature: str,
    tolerance: int = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> bool:
    """What a receiver does: constant-time compare, and a timestamp within `tolerance`."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - ts) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)
