"""Validation at the boundary, once, for every door (SPEC §8 "Bad input", §4 "Limits").

Every request model of the HTTP API, the console, the CLI, `AutoSessionManager` and
the import's rows inherits `BoundaryModel`, whose one validator checks every field:

- a string must be valid Unicode: a lone surrogate (``"\\ud800"``, which JSON allows
  and Python keeps) can be neither stored in utf8mb4 nor encoded for an answer, so
  it is refused with the field that holds it;
- a free-form JSON value (`JsonObject`, `JsonValue`) may nest at most `MAX_JSON_DEPTH`
  levels, holds only finite numbers and 64-bit integers (what MySQL's JSON keeps
  exactly), and serializes to at most `MAX_JSON_FIELD_BYTES`;
- a time (`BoundedTime`) lies between 1970-01-01 and one day from now.

A refusal is a `ValueError` naming the path inside the field (``context.a.0: …``);
pydantic adds the field itself, so the 422 names both. The walk is iterative, so a
crafted depth cannot exhaust the interpreter's stack.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ValidationError, field_validator

from app.db import utcnow
from app.errors import ValidationFailed

MAX_JSON_DEPTH = 32
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_AHEAD = timedelta(days=1)


@dataclass
class Limits:
    """The configurable limits; `configure()` sets them from the settings at start-up."""

    max_json_field_bytes: int = 64 * 1024


limits = Limits()


def configure(*, max_json_field_bytes: int) -> None:
    limits.max_json_field_bytes = max_json_field_bytes


def unicode_problem(text: str) -> str | None:
    """Why `text` is not valid Unicode (a lone surrogate), or None when it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode (lone surrogate U+{ord(text[exc.start]):04X} at " \
               f"character {exc.start})"
    return None


def check_text(text: str) -> str:
    """A string that must be valid Unicode (raises ValueError naming the problem)."""
    problem = unicode_problem(text)
    if problem:
        raise ValueError(problem)
    return text


def _path(parts: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in parts)


def check_tree(value: Any, *, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Walk a parsed value (dicts, lists, scalars; pydantic models are checked by their
    own validators) and raise ValueError at the first string that is not valid Unicode,
    number that JSON storage cannot keep, or level deeper than `max_depth`."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            problem = unicode_problem(item)
            if problem:
                where = f"{_path(path)}: " if path else ""
                raise ValueError(f"{where}{problem}")
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                where = f"{_path(path)}: " if path else ""
                raise ValueError(f"{where}integer out of the 64-bit range")
        elif isinstance(item, float):
            if not math.isfinite(item):
                where = f"{_path(path)}: " if path else ""
                raise ValueError(f"{where}number is not finite")
        elif isinstance(item, dict | list | tuple):
            if len(path) >= max_depth:
                raise ValueError(f"{_path(path)}: nested deeper than {max_depth} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    if isinstance(key, str):
                        problem = unicode_problem(key)
                        if problem:
                            raise ValueError(f"{_path((*path, '<key>'))}: key {problem}")
                    stack.append((child, (*path, str(key))))
            else:
                stack.extend((child, (*path, i)) for i, child in enumerate(item))


def check_json_size(value: Any) -> Any:
    """A free-form JSON value no larger than MAX_JSON_FIELD_BYTES once serialized."""
    check_tree(value)
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                          default=str).encode("utf-8"))
    if size > limits.max_json_field_bytes:
        raise ValueError(
            f"is {size} bytes serialized; at most {limits.max_json_field_bytes} "
            "(MAX_JSON_FIELD_BYTES)"
        )
    return value


def check_time_range(moment: datetime) -> datetime:
    """A message time: from 1970-01-01 to one day from now (aware UTC expected)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if moment < EARLIEST_TIME or moment > utcnow() + LATEST_AHEAD:
        raise ValueError(
            f"time {moment.isoformat()} is outside 1970-01-01 … now + 1 day"
        )
    return moment


JsonObject = Annotated[dict[str, Any], AfterValidator(check_json_size)]
"""A free-form JSON object field (`context`, `task_state`, `customer_info`, …)."""

JsonValue = Annotated[Any, AfterValidator(check_json_size)]
"""A free-form JSON value of any kind (`result`)."""

BoundedTime = Annotated[datetime, AfterValidator(check_time_range)]


def field_errors(exc: ValidationError, *, prefix: Iterable[str | int] = ()) -> list[dict[str, Any]]:
    """pydantic errors as `{"field", "message", "type"}` items (the one shape of a field
    error, SPEC §8); the field is a dotted path."""
    out = []
    for error in exc.errors(include_url=False, include_context=False, include_input=False):
        loc = [*prefix, *error["loc"]]
        out.append({
            "field": ".".join(str(part) for part in loc) or "body",
            "message": error["msg"].removeprefix("Value error, "),
            "type": error["type"],
        })
    return out


def validated[M: BaseModel](model: type[M], data: Any) -> M:
    """`data` as `model`, or the domain's 422 naming every bad field (for the doors that
    are not HTTP: `AutoSessionManager`, the CLI)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = field_errors(exc)
        names = ", ".join(sorted({e["field"] for e in errors}))
        raise ValidationFailed(f"invalid {model.__name__}: {names}", errors=errors) from None


class BoundaryModel(BaseModel):
    """Base of every request model: each field's strings and containers are checked by
    `check_tree` (valid Unicode, finite numbers, bounded depth), whatever the door.
    (Each model keeps its own `extra` policy: bodies forbid unknown fields, queries
    ignore them.)"""

    @field_validator("*", mode="after")
    @classmethod
    def _valid_everywhere(cls, value: Any) -> Any:
        if isinstance(value, str):
            return check_text(value)
        if isinstance(value, dict | list | tuple):
            check_tree(value)
        return value
