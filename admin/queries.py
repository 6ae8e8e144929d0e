"""What the admin API and console accept (SPEC §7): query filters and request bodies.

Pydantic boundary models, so a bad query or body is a 422 naming the field; times are
UTC, enumerations case-insensitive, and empty form fields mean "no filter".
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, ConfigDict, Field, field_validator

from app.sessions.enums import Origin, SessionStatus, SessionType
from app.validation import BoundaryModel

MAX_PAGE = 200
# Integer cursors and offsets are row ids or positions: they fit a signed 64-bit column, so
# anything larger is malformed (and would overflow the database driver, a 500).
MAX_CURSOR = 2**63 - 1
MAX_VERIFY_SESSIONS = 10_000
DEFAULT_VERIFY_SESSIONS = 1_000


def _as_utc(value: datetime | None) -> datetime | None:
    """Naive times in a query are UTC (the API speaks UTC everywhere); a time whose UTC
    falls outside years 1..9999 (`9999-12-31T23:59-05:00`) is refused, not a 500."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC) if value is not None else None
    except OverflowError:
        raise ValueError("out of range once converted to UTC") from None


UtcTime = Annotated[datetime | None, AfterValidator(_as_utc)]


def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _blank_none(value: Any) -> Any:
    """Empty form fields (the console's search form sends them) mean "no filter"."""
    return None if isinstance(value, str) and not value.strip() else value


class SessionSearch(BoundaryModel):
    """Filters of the admin session search; enumerations are case-insensitive, times UTC."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    account_id: str | None = Field(default=None, max_length=64)
    shop_id: str | None = Field(default=None, max_length=64)
    status: SessionStatus | None = None
    session_type: SessionType | None = Field(
        default=None, validation_alias=AliasChoices("session_type", "type")
    )
    owner_id: str | None = Field(default=None, max_length=64)
    origin: Origin | None = None
    created_from: UtcTime = Field(
        default=None, validation_alias=AliasChoices("created_from", "from"),
        description="created at or after (ISO 8601; naive = UTC)",
    )
    created_to: UtcTime = Field(
        default=None, validation_alias=AliasChoices("created_to", "to"),
        description="created before (ISO 8601; naive = UTC)",
    )
    after: str | None = Field(default=None, max_length=64, description="cursor from `next`")
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)

    _blank = field_validator(
        "account_id", "shop_id", "status", "session_type", "owner_id", "origin",
        "created_from", "created_to", "after", mode="before",
    )(_blank_none)

    @field_validator("status", "session_type", mode="before")
    @classmethod
    def _upper_enums(cls, value: Any) -> Any:
        return _upper(_blank_none(value))

    @field_validator("origin", mode="before")
    @classmethod
    def _lower_origin(cls, value: Any) -> Any:
        return _lower(_blank_none(value))


class AuditSearch(BoundaryModel):
    """Filters of the audit log search (SPEC §7: "searchable in the admin API")."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    session_id: str | None = Field(default=None, max_length=40)
    actor: str | None = Field(default=None, max_length=128)
    operation: str | None = Field(default=None, max_length=32)
    created_from: UtcTime = Field(default=None, validation_alias=AliasChoices("created_from",
                                                                              "from"))
    created_to: UtcTime = Field(default=None, validation_alias=AliasChoices("created_to", "to"))
    after: int | None = Field(default=None, ge=1, le=MAX_CURSOR,
                              description="cursor from `next`")
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)

    _blank = field_validator("*", mode="before")(_blank_none)


class VerifyRange(BoundaryModel):
    """Which chains to verify: sessions with audit rows in [from, to), all or a sample."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    created_from: UtcTime = Field(default=None, validation_alias=AliasChoices("created_from",
                                                                              "from"))
    created_to: UtcTime = Field(default=None, validation_alias=AliasChoices("created_to", "to"))
    sample: int | None = Field(default=None, ge=1, le=MAX_VERIFY_SESSIONS,
                               description="verify this many sessions picked at random")
    limit: int = Field(default=DEFAULT_VERIFY_SESSIONS, ge=1, le=MAX_VERIFY_SESSIONS)

    _blank = field_validator("*", mode="before")(_blank_none)


class PageQuery(BoundaryModel):
    """A plain newest-first page over an integer key."""

    model_config = ConfigDict(extra="ignore")

    after: int | None = Field(default=None, ge=1, le=MAX_CURSOR,
                              description="cursor from `next`")
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)

    _blank = field_validator("*", mode="before")(_blank_none)


class DeliveryQuery(PageQuery):
    client_id: str | None = Field(default=None, max_length=40)
    status: Literal["pending", "delivered", "failed"] | None = Field(
        default=None, description="`failed`: the given-up deliveries (redeliverable)")
    session_id: str | None = Field(default=None, max_length=40)

    @field_validator("status", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class Redelivery(BoundaryModel):
    """Body of a redelivery (optional): why, kept in the session's audit row."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="redelivered by operator", min_length=1, max_length=255)


class ImportListQuery(BoundaryModel):
    model_config = ConfigDict(extra="ignore")

    after: str | None = Field(default=None, max_length=40, description="cursor from `next`")
    status: str | None = Field(default=None, max_length=24)
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)

    _blank = field_validator("*", mode="before")(_blank_none)


class OffsetQuery(BoundaryModel):
    model_config = ConfigDict(extra="ignore")

    offset: int = Field(default=0, ge=0, le=MAX_CURSOR)
    limit: int = Field(default=100, ge=1, le=1000)


class SlotQuery(BoundaryModel):
    model_config = ConfigDict(extra="ignore")

    account_id: str = Field(min_length=1, max_length=64)
    shop_id: str = Field(min_length=1, max_length=64)

    @field_validator("account_id", "shop_id", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return str(value).strip() if isinstance(value, int | str) else value


class OperatorAction(BoundaryModel):
    """Body of a force action: why the operator did it (kept in the audit row)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="closed by operator", min_length=1, max_length=255)


class SlotRelease(SlotQuery, OperatorAction):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="slot released by operator", min_length=1, max_length=255)


class ClientCreate(BoundaryModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    role: str = Field(description="bot, desk or admin")
    webhook_url: str | None = Field(default=None, max_length=1024)
