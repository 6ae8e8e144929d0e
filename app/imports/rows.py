"""One chat-export row (SPEC §4): aliases, sender role, time zone and a stable id.

Shared by the history import, live messages and `AutoSessionManager.process_chat_messages`.
A row is checked at the boundary like every request (`app.validation.BoundaryModel`):
each string must be valid Unicode, `sent_at` lies between 1970-01-01 and one day from
now, and a bad value is a `ValueError` (one bad row), never anything that fails the
rows around it.

The import validates every row into a `Msg` (`validate_row`): the common, plain row
without pydantic (`plain_msg`, several times cheaper), every other one through `ChatRow`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any

from pydantic import (
    AliasChoices,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.db import utcnow
from app.sessions.enums import SenderRole, TaskType
from app.validation import (
    EARLIEST_TIME,
    LATEST_AHEAD,
    BoundaryModel,
    BoundedTime,
    check_tree,
)

# The row fields the import reads (the names and aliases above); others are dropped early.
KNOWN_FIELDS = frozenset({
    "message_id", "account_id", "user_id", "shop_id", "sender_role", "is_robot", "direction",
    "sender_id", "content", "message_type", "sent_at", "timestamp", "session_id", "task_type",
    "reply_to", "in_reply_to", "in_response_to", "thread_id", "conversation_id", "thread",
})
# Threading fields (SPEC §4) and their aliases, as a row may spell them.
REPLY_ALIASES = ("reply_to", "in_reply_to", "in_response_to")
THREAD_ALIASES = ("thread_id", "conversation_id", "thread")
MAX_THREAD_ID = 128

MAX_CONTENT_BYTES = 65535  # MySQL TEXT; longer rows are refused, never truncated
ROLE_ALIASES: dict[str, SenderRole] = {
    "robot": SenderRole.ROBOT,
    "bot": SenderRole.ROBOT,
    "human": SenderRole.HUMAN,
    "staff": SenderRole.HUMAN,
    "agent": SenderRole.HUMAN,
    "counterpart": SenderRole.COUNTERPART,
    "customer": SenderRole.COUNTERPART,
    "shop": SenderRole.COUNTERPART,
    "system": SenderRole.SYSTEM,
}
OUTBOUND = {"outbound", "out", "sent", "send", "outgoing"}
INBOUND = {"inbound", "in", "received", "receive", "incoming"}
TRUE_TEXT = {"true", "1", "yes", "y", "t"}
FALSE_TEXT = {"false", "0", "no", "n", "f", ""}


def id_text(value: Any) -> Any:
    """Ids are text: integers (and integral floats from spreadsheets) become strings."""
    if isinstance(value, bool):
        raise ValueError("must be a string or an integer")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return value.strip()
    return value


def parse_flag(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    text = str(value).strip().lower()
    if text in TRUE_TEXT:
        return True
    if text in FALSE_TEXT:
        return False if text else None
    raise ValueError(f"is not a yes/no flag: {value!r}")


def parse_time(value: Any, tz: tzinfo) -> datetime:
    """ISO 8601 (a naive time is in `tz`), or epoch seconds/milliseconds.

    Raises ValueError for anything it cannot turn into an aware UTC time, including a
    number or a date at the edge of the calendar that no UTC time can hold (1e300,
    ``0001-01-01T00:00:00+14:00``): those are one bad row, not an OverflowError."""
    try:
        if isinstance(value, datetime):
            moment = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError("is not a finite number")
            try:
                seconds = value / 1000 if value > 1e11 else value
                return datetime.fromtimestamp(seconds, UTC)
            except (OverflowError, OSError, ValueError):
                raise ValueError("epoch number is outside 1970-01-01 … now + 1 day") from None
        elif isinstance(value, str) and value.strip():
            text = value.strip()
            if text.endswith("Z"):
                text = text[:-1] + "+00:00"
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                raise ValueError(f"is not an ISO 8601 time: {value[:64]!r}") from None
        else:
            raise ValueError("is missing")
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=tz)
        return moment.astimezone(UTC)
    except (OverflowError, OSError):
        # fromtimestamp/astimezone past the calendar's ends (years 1 and 9999, huge epochs)
        raise ValueError("time is outside 1970-01-01 … now + 1 day") from None


class ChatRow(BoundaryModel):
    """A validated message row. Validate with `context={"tz": ZoneInfo(...)}`.

    Every string field must be valid Unicode (`BoundaryModel`); unknown fields are
    ignored (exports carry columns of their own)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, str_strip_whitespace=False)

    message_id: str | None = Field(default=None, max_length=128)
    account_id: str | None = Field(
        default=None, validation_alias=AliasChoices("account_id", "user_id"), max_length=64
    )
    shop_id: str | None = Field(default=None, max_length=64)
    sender_role: SenderRole | None = None
    is_robot: bool | None = None
    direction: str | None = None
    sender_id: str | None = Field(default=None, max_length=64)
    content: str = Field(max_length=65535)
    message_type: str = Field(default="text", max_length=32)
    sent_at: BoundedTime = Field(validation_alias=AliasChoices("sent_at", "timestamp"))
    session_id: str | None = Field(default=None, max_length=40)
    task_type: TaskType | None = None
    # Threading: the message this row answers (a message_id), the source's conversation
    # key. A reply_to naming no message of the slot is no error: the gap rule decides.
    reply_to: str | None = Field(
        default=None, validation_alias=AliasChoices(*REPLY_ALIASES), max_length=128
    )
    thread_id: str | None = Field(
        default=None, validation_alias=AliasChoices(*THREAD_ALIASES), max_length=MAX_THREAD_ID
    )

    _ids = field_validator(
        "message_id", "account_id", "shop_id", "sender_id", "session_id", "reply_to",
        "thread_id", mode="before"
    )(id_text)

    @field_validator("message_id", "account_id", "shop_id", "sender_id", "session_id",
                     "reply_to", "thread_id")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("sender_role", mode="before")
    @classmethod
    def _role(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        role = ROLE_ALIASES.get(str(value).strip().lower())
        if role is None:
            raise ValueError(
                f"unknown sender_role {value!r} (use robot, human, counterpart or system)"
            )
        return role

    @field_validator("is_robot", mode="before")
    @classmethod
    def _flag(cls, value: Any) -> Any:
        return parse_flag(value)

    @field_validator("task_type", mode="before")
    @classmethod
    def _task(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value.strip().lower() or None
        return value

    @field_validator("message_type", mode="before")
    @classmethod
    def _message_type(cls, value: Any) -> Any:
        return "text" if value is None or value == "" else value

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("is missing")
        if isinstance(value, dict | list):
            check_tree(value)  # depth and Unicode first: str() of a crafted tree recurses
        return value if isinstance(value, str) else str(value)

    @field_validator("content")
    @classmethod
    def _fits_a_text_column(cls, value: str) -> str:
        # MySQL's TEXT holds 65,535 bytes: a longer message is refused, never truncated
        if len(value) * 4 > MAX_CONTENT_BYTES and (
                len(value.encode("utf-8", "surrogatepass")) > MAX_CONTENT_BYTES):
            raise ValueError(f"longer than {MAX_CONTENT_BYTES} bytes in UTF-8")
        return value

    @field_validator("sent_at", mode="before")
    @classmethod
    def _time(cls, value: Any, info: ValidationInfo) -> datetime:
        tz = (info.context or {}).get("tz", UTC)
        return parse_time(value, tz)

    @model_validator(mode="after")
    def _derive(self, info: ValidationInfo) -> ChatRow:
        context = info.context or {}
        if self.sender_role is None:
            self.sender_role = derive_role(self.is_robot, self.direction) or context.get(
                "default_role"
            )
            if self.sender_role is None:
                raise ValueError(
                    "sender_role is missing (give sender_role, or is_robot and direction)"
                )
        if self.session_id is None and (self.account_id is None or self.shop_id is None):
            missing = "account_id" if self.account_id is None else "shop_id"
            raise ValueError(f"{missing} is missing (required unless session_id is given)")
        if self.message_id is None:
            self.message_id = stable_message_id(self)
        return self


def derive_role(is_robot: bool | None, direction: str | None) -> SenderRole | None:
    """`is_robot` plus `direction`: a robot message, our staff's, or the counterpart's."""
    flow = (direction or "").strip().lower()
    if is_robot:
        return SenderRole.ROBOT
    if flow in INBOUND:
        return SenderRole.COUNTERPART
    if flow in OUTBOUND:
        return SenderRole.HUMAN
    return None


def stable_message_id(row: ChatRow) -> str:
    """A re-upload of the same row yields the same id, so it de-duplicates."""
    parts = [
        row.account_id or "",
        row.shop_id or "",
        row.session_id or "",
        str(row.sender_role),
        row.sender_id or "",
        row.sent_at.astimezone(UTC).isoformat(timespec="microseconds"),
        row.content,
    ]
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return "h_" + digest[:40]


def row_error_text(exc: ValidationError) -> str:
    """One line naming each bad field: `sent_at: is not an ISO 8601 time: 'x'`."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "row"
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {message}")
    return "; ".join(parts)


# ---- the validated row ------------------------------------------------------------------
Slot = tuple[str, str]  # (account_id, shop_id)


@dataclass(slots=True)
class Msg:
    """A validated row on its way to the messages table."""

    line: int
    message_id: str
    account_id: str
    shop_id: str
    sender_role: SenderRole
    sender_id: str | None
    content: str
    message_type: str
    sent_at: datetime
    session_id: str | None
    task_type: TaskType | None
    reply_to: str | None = None
    thread_id: str | None = None

    @classmethod
    def from_row(cls, line: int, row: ChatRow) -> Msg:
        return cls(
            line=line, message_id=row.message_id or "", account_id=row.account_id or "",
            shop_id=row.shop_id or "", sender_role=SenderRole(str(row.sender_role)),
            sender_id=row.sender_id, content=row.content, message_type=row.message_type,
            sent_at=row.sent_at, session_id=row.session_id, task_type=row.task_type,
            reply_to=row.reply_to, thread_id=row.thread_id,
        )


def validate_row(line: int, fields: dict[str, Any], tz: Any, *,
                 latest: datetime | None = None) -> Msg | str:
    """A `Msg`, or the reason the row is refused (naming the field). `latest` is the
    newest time accepted (default: now + 1 day); the import pins it to the job's start
    so that a retried chunk judges every row as the first attempt did."""
    bound = latest if latest is not None else utcnow() + LATEST_AHEAD
    msg = plain_msg(line, fields, tz, latest=bound)
    if msg is None:
        try:
            row = ChatRow.model_validate(fields, context={"tz": tz})
        except ValidationError as exc:
            return row_error_text(exc)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            return f"row: {type(exc).__name__}: {str(exc)[:200]}"
        msg = Msg.from_row(line, row)
        if msg.sent_at > bound:
            return (f"sent_at: time {msg.sent_at.isoformat()} is outside 1970-01-01 … "
                    "now + 1 day")
    return check_msg(msg)


def _valid_text(text: str) -> bool:
    """Valid Unicode (no lone surrogate): free for ASCII, one encode otherwise."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_ROLES = {alias: SenderRole(role) for alias, role in ROLE_ALIASES.items()}
_TASKS = {t.value: t for t in TaskType}
_PLAIN_ABSENT = ("user_id", "timestamp", "is_robot", "direction", "in_reply_to",
                 "in_response_to", "conversation_id", "thread")
_PLAIN_ABSENT_KEYS = frozenset(_PLAIN_ABSENT)


def _plain_id(value: Any, max_length: int, *, required: bool) -> str | None | bool:
    """A stripped id as ChatRow makes it, None for blank, or False: not plain."""
    if value is None:
        return False if required else None
    if type(value) is not str:
        return False
    text = value.strip()
    if len(text) > max_length or (required and not text):
        return False
    return text or None


def plain_msg(line: int, fields: dict[str, Any], tz: Any, *,
              latest: datetime | None = None) -> Msg | None:
    """The `Msg` that `ChatRow` validation gives for the common, plain row (text ids,
    a known sender_role, an ISO time within 1970-01-01 … `latest`, valid Unicode, no
    aliases), built without pydantic: the import validates every row, and this is
    several times cheaper. None means "not plain": the caller validates the row with
    `ChatRow` (which also words every error)."""
    get = fields.get
    if not _PLAIN_ABSENT_KEYS.isdisjoint(fields):
        for name in _PLAIN_ABSENT:
            if get(name) is not None:
                return None
    # The ids as `_plain_id` makes them, inline: this runs for every row of an import.
    message_id = get("message_id")
    account_id = get("account_id")
    shop_id = get("shop_id")
    if type(message_id) is not str or type(account_id) is not str or type(shop_id) is not str:
        return None
    message_id, account_id, shop_id = message_id.strip(), account_id.strip(), shop_id.strip()
    if (not message_id or len(message_id) > 128 or not account_id or len(account_id) > 64
            or not shop_id or len(shop_id) > 64):
        return None
    sender_id = _plain_id(get("sender_id"), 64, required=False)
    session_id = _plain_id(get("session_id"), 40, required=False)
    if sender_id is False or session_id is False:
        return None
    reply_to = thread_id = None
    if "reply_to" in fields or "thread_id" in fields:
        reply_to = _plain_id(get("reply_to"), 128, required=False)
        thread_id = _plain_id(get("thread_id"), MAX_THREAD_ID, required=False)
        if reply_to is False or thread_id is False:
            return None
    role = get("sender_role")
    content = get("content")
    sent_at = get("sent_at")
    if type(role) is not str or type(content) is not str or type(sent_at) is not str:
        return None
    sender_role = _ROLES.get(role.strip().lower())
    if sender_role is None or len(content) > 65535:
        return None
    message_type = get("message_type")
    if message_type is None or message_type == "":
        message_type = "text"
    elif type(message_type) is not str or len(message_type) > 32:
        return None
    task = get("task_type")
    task_type: TaskType | None = None
    if task is not None:
        if type(task) is not str:
            return None
        task = task.strip().lower()
        if task:
            task_type = _TASKS.get(task)
            if task_type is None:
                return None
    try:  # an ISO time as it is, as `parse_time` reads it (and it reads all the rest)
        moment = datetime.fromisoformat(sent_at)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=tz)
        if moment.tzinfo is not UTC:
            moment = moment.astimezone(UTC)
    except ValueError:
        try:
            moment = parse_time(sent_at, tz)
        except ValueError:
            return None
    except (OverflowError, OSError):
        return None
    if moment < EARLIEST_TIME or moment > (latest or utcnow() + LATEST_AHEAD):
        return None
    if not (content.isascii() and message_id.isascii()  # type: ignore[union-attr]
            and account_id.isascii() and shop_id.isascii()  # type: ignore[union-attr]
            and message_type.isascii() and (sender_id is None or sender_id.isascii())  # type: ignore[union-attr]
            and (session_id is None or session_id.isascii())  # type: ignore[union-attr]
            and (reply_to is None or reply_to.isascii())  # type: ignore[union-attr]
            and (thread_id is None or thread_id.isascii())):  # type: ignore[union-attr]
        texts = (content, message_id, account_id, shop_id, message_type, sender_id,
                 session_id, reply_to, thread_id)
        if not all(_valid_text(t) for t in texts if isinstance(t, str)):
            return None
    return Msg(line=line, message_id=message_id, account_id=account_id,  # type: ignore[arg-type]
               shop_id=shop_id, sender_role=sender_role, sender_id=sender_id,  # type: ignore[arg-type]
               content=content, message_type=message_type, sent_at=moment,
               session_id=session_id, task_type=task_type,  # type: ignore[arg-type]
               reply_to=reply_to, thread_id=thread_id)  # type: ignore[arg-type]


def check_msg(msg: Msg) -> Msg | str:
    if len(msg.content) * 4 > MAX_CONTENT_BYTES and (
        len(msg.content.encode("utf-8", "surrogatepass")) > MAX_CONTENT_BYTES
    ):
        return f"content: longer than {MAX_CONTENT_BYTES} bytes in UTF-8"
    if not msg.account_id or not msg.shop_id:
        return "account_id and shop_id are required (or a session_id naming a known session)"
    return msg
