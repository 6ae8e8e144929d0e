"""Public, opaque identifiers: a short prefix and 20 random url-safe characters."""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(15)}"
