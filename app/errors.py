"""The domain's exception tree. Each error knows its HTTP status and problem type;
`app.api.problems` renders them as RFC 9457 problem documents."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class AutoSessionError(Exception):
    """Base of every error the service layer raises on purpose."""

    status: int = 400
    type: str = "about:blank"
    title: str = "Bad request"
    retryable: bool = False

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def problem(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        body.update(self.extra)
        return body


class ValidationFailed(AutoSessionError):
    status = 422
    type = "/problems/validation"
    title = "Invalid request"

    def __init__(self, detail: str, errors: Iterable[dict[str, Any]] = ()) -> None:
        super().__init__(detail, errors=list(errors))


class NotFound(AutoSessionError):
    status = 404
    type = "/problems/not-found"
    title = "Not found"


class Unauthorized(AutoSessionError):
    status = 401
    type = "/problems/unauthorized"
    title = "Authentication required"


class Forbidden(AutoSessionError):
    status = 403
    type = "/problems/forbidden"
    title = "Not allowed"


class Conflict(AutoSessionError):
    status = 409
    type = "/problems/conflict"
    title = "Conflict"


class InvalidTransition(Conflict):
    type = "/problems/invalid-transition"
    title = "Transition not allowed"

    def __init__(
        self, *, current: str, target: str, allowed: list[str], detail: str | None = None
    ) -> None:
        allowed_text = ", ".join(allowed) if allowed else "none (terminal status)"
        super().__init__(
            detail
            or f"cannot go from {current} to {target}; allowed from {current}: {allowed_text}",
            current_status=str(current),
            requested_status=str(target),
            allowed=[str(a) for a in allowed],
        )


class NotInControl(Conflict):
    """The session is controlled by another party now (its bot, or the desk)."""

    type = "/problems/not-in-control"
    title = "Another party controls this session now"


class SlotOccupied(Conflict):
    """A request with `on_conflict: reject` met an occupant it may not preempt.

    Raised with the occupant's whole view; the door that knows the caller narrows it
    with `for_viewer` (SPEC §3.5: a caller that could not read the occupant learns only
    its status, type, priority and creation time)."""

    type = "/problems/slot-occupied"
    title = "Slot occupied"
    PUBLIC_FIELDS = ("status", "session_type", "priority", "created_at")

    def __init__(self, detail: str, occupant: dict[str, Any]) -> None:
        super().__init__(detail, occupant=occupant)
        self.occupant = occupant

    def for_viewer(self, may_see: bool) -> SlotOccupied:
        if may_see:
            return self
        narrowed = {name: self.occupant.get(name) for name in self.PUBLIC_FIELDS}
        return SlotOccupied(self.detail, occupant=narrowed)


class AlreadyAccepted(Conflict):
    type = "/problems/transfer-already-accepted"
    title = "Transfer already taken"


class NotAssignee(Conflict):
    """One agent speaks (SPEC §12): the session's transfer was accepted by another agent."""

    type = "/problems/not-assignee"
    title = "Another agent is assigned to this session"


class IdempotencyMismatch(Conflict):
    type = "/problems/idempotency-key-reuse"
    title = "Idempotency key reused with another request"


class CorrectionRefused(Conflict):
    """An operator's merge or split (SPEC §11) would touch a session that occupies the
    slot, or sessions it cannot join or cut (another slot, not ended, already merged)."""

    type = "/problems/correction-refused"
    title = "Correction refused"


class UploadTooLarge(AutoSessionError):
    """An upload past MAX_UPLOAD_BYTES on the wire: refused, nothing of it kept."""

    status = 413
    type = "/problems/upload-too-large"
    title = "Upload too large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the upload is larger than MAX_UPLOAD_BYTES ({limit} bytes)",
                         max_upload_bytes=limit)


class RateLimited(AutoSessionError):
    """A client spent its request budget, or an address failed to authenticate too often.

    Rendered with `Retry-After` by `app.api.ratelimit.render_rate_limited`."""

    status = 429
    type = "/problems/rate-limited"
    title = "Too many requests"
    retryable = True

    def __init__(self, detail: str, *, limit: str, setting: str, retry_after: int) -> None:
        super().__init__(detail, limit=limit, setting=setting, retry_after=retry_after)
        self.retry_after = retry_after


class CursorExpired(AutoSessionError):
    """The feed or stream cursor points before the oldest event still kept (retention)."""

    status = 410
    type = "/problems/cursor-expired"
    title = "Cursor expired"

    def __init__(self, detail: str, *, oldest_cursor: int) -> None:
        super().__init__(detail, oldest_cursor=oldest_cursor)


class ServiceUnavailable(AutoSessionError):
    """Retry later: the slot lock could not be had, or a dependency is down."""

    status = 503
    type = "/problems/unavailable"
    title = "Temporarily unavailable"
    retryable = True


class StreamsFull(ServiceUnavailable):
    """This process already serves its maximum number of event streams (STREAM_MAX)."""


class SlotBusy(ServiceUnavailable):
    type = "/problems/slot-busy"
    title = "Slot busy"


class SlotLockUnavailable(ServiceUnavailable):
    type = "/problems/lock-unavailable"
    title = "Slot lock service unavailable"


class FenceRejected(ServiceUnavailable):
    """The slot changed under a holder whose lock had expired; its change was refused."""

    type = "/problems/stale-slot-holder"
    title = "Slot changed concurrently"
