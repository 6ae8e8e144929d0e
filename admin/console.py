"""The admin console: server-rendered pages under `/admin/` for operations staff.

Pages read through the admin modules (the same functions as the admin API); the little
JavaScript there is (charts, the upload's progress bar, the chain check) calls the
admin API with the console cookie and the CSRF header. Forms post with the CSRF
token. English and Chinese, switched at `/admin/lang/<code>`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from pydantic import ValidationError
from werkzeug.wrappers import Response as WerkzeugResponse

from admin import sessions as admin_sessions
from admin import stats as admin_stats
from admin import transfers as admin_transfers
from admin.auth import (
    check_csrf,
    console_identity,
    csrf_token,
    log_in,
    log_out,
)
from admin.i18n import LANGUAGES, current_language, js_messages, translate
from admin.queries import OperatorAction, Redelivery, SessionSearch, SlotQuery, SlotRelease
from app.agents.service import AgentFilters, AgentService
from app.api.auth import client_service
from app.api.http import runtime
from app.api.problems import field_errors
from app.api.ratelimit import count_failed_authentication
from app.api.stream import stream_url_for_console
from app.clients.service import ClientRole
from app.delivery.service import delivery_log, redeliver
from app.errors import AutoSessionError, RateLimited, Unauthorized
from app.imports import jobs as import_jobs
from app.imports.service import ImportService
from app.sessions.enums import Origin, SessionStatus, SessionType
from app.transfers.enums import TransferStatus

bp = Blueprint("console", __name__, template_folder="templates")


@bp.context_processor
def _template_context() -> dict[str, Any]:
    lang = current_language()
    return {
        "t": lambda key: translate(key, lang),
        "lang": lang,
        "languages": LANGUAGES,
        "csrf_token": csrf_token,
        "operator": console_identity(),
        "js_messages": js_messages(lang),
    }


def login_required[F: Callable[..., Any]](view: F) -> F:
    """Pages need a console log-in; posts also need the CSRF token."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if console_identity() is None:
            return redirect(url_for("admin.console.login", next=request.full_path))
        if request.method == "POST":
            check_csrf()
        return view(*args, **kwargs)

    return cast(F, wrapper)


@bp.errorhandler(AutoSessionError)
def _domain_error(exc: AutoSessionError) -> Any:
    if isinstance(exc, Unauthorized):
        return redirect(url_for("admin.console.login"))
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else {}
    return render_template("error.html", error=exc), exc.status, headers


@bp.errorhandler(ValidationError)
def _validation_error(exc: ValidationError) -> Any:
    errors = field_errors(exc)
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return render_template("error.html", error=AutoSessionError(detail)), 422


def _safe_next(target: str | None) -> str:
    """Only same-site paths under /admin are followed after log-in (no open redirect)."""
    if target and target.startswith("/admin") and not urlsplit(target).netloc:
        return target
    return url_for("admin.console.dashboard")


# ---- log-in, language ---------------------------------------------------------------------
@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    error = None
    if request.method == "POST":
        check_csrf()
        token = (request.form.get("token") or "").strip()
        identity = client_service().authenticate(token) if token else None
        if identity is None:
            error = "login_bad_token"
            try:
                count_failed_authentication()
            except RateLimited as exc:
                return render_template("login.html", error="login_rate_limited",
                                       next=request.args.get("next", "")), exc.status, {
                                           "Retry-After": str(exc.retry_after)}
        elif identity.role != ClientRole.ADMIN:
            error = "login_not_admin"
        else:
            log_in(identity, token)
            return redirect(_safe_next(request.args.get("next")))
    status = 401 if error else 200
    return render_template("login.html", error=error,
                           next=request.args.get("next", "")), status


@bp.post("/logout")
def logout() -> WerkzeugResponse:
    check_csrf()
    log_out()
    return redirect(url_for("admin.console.login"))


@bp.get("/lang/<code>")
def switch_language(code: str) -> WerkzeugResponse:
    if code in LANGUAGES:
        session["lang"] = code
    target = request.args.get("next")
    if not target and request.referrer:
        parts = urlsplit(request.referrer)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
    return redirect(_safe_next(target))


# ---- pages ----------------------------------------------------------------------------------
@bp.get("/")
@login_required
def dashboard() -> str:
    with runtime().database.read() as db:
        stats = admin_stats.statistics(db)
    return render_template("dashboard.html", stats=stats, stats_json=stats["hourly"])


@bp.get("/sessions")
@login_required
def sessions() -> str:
    search = SessionSearch.model_validate(request.args.to_dict())
    with runtime().database.read() as db:
        items, following = admin_sessions.search_sessions(db, search)
    args = {k: v for k, v in request.args.items() if k != "after" and v}
    return render_template(
        "sessions.html", items=items, following=following, args=args,
        statuses=list(SessionStatus), types=list(SessionType), origins=list(Origin),
        searched=bool(request.args),
    )


@bp.get("/sessions/<session_id>")
@login_required
def session_page(session_id: str) -> str:
    with runtime().database.read() as db:
        detail = admin_sessions.session_detail(db, session_id)
    return render_template("session.html", d=detail, s=detail["session"])


@bp.post("/sessions/<session_id>/force-close")
@login_required
def force_close(session_id: str) -> WerkzeugResponse:
    operator = console_identity()
    assert operator is not None
    action = OperatorAction.model_validate(
        {"reason": request.form.get("reason") or "closed by operator"})
    admin_sessions.force_close(runtime().sessions, session_id, actor=operator.actor,
                               reason=action.reason, operator=operator.name)
    return redirect(url_for("admin.console.session_page", session_id=session_id))


@bp.get("/slots")
@login_required
def slot_page() -> str:
    query = SlotQuery.model_validate(request.args.to_dict())
    with runtime().database.read() as db:
        slot = admin_sessions.slot_view(db, query.account_id, query.shop_id)
    return render_template("slot.html", slot=slot, live=live_marker(
        "slot-state", account_id=query.account_id, shop_id=query.shop_id))


@bp.post("/slots/release")
@login_required
def release_slot() -> WerkzeugResponse:
    operator = console_identity()
    assert operator is not None
    body = SlotRelease.model_validate({
        "account_id": request.form.get("account_id"), "shop_id": request.form.get("shop_id"),
        "reason": request.form.get("reason") or "slot released by operator",
    })
    admin_sessions.release_slot(runtime().sessions, body.account_id, body.shop_id,
                                actor=operator.actor, reason=body.reason,
                                operator=operator.name)
    return redirect(url_for("admin.console.slot_page", account_id=body.account_id,
                            shop_id=body.shop_id))


@bp.get("/transfers")
@login_required
def transfers() -> str:
    with runtime().database.read() as db:
        queue = admin_transfers.transfer_queue(db)
        accepted = admin_transfers.transfer_queue(db, status=TransferStatus.ACCEPTED)
    return render_template("transfers.html", queue=queue, accepted=accepted,
                           live=live_marker("transfer-queue transfer-accepted"))


def live_marker(regions: str, *, account_id: str | None = None,
                shop_id: str | None = None) -> dict[str, str | None]:
    """What a live page's `_live.html` needs: the stream's URL (`app.api.stream`), the ids
    of the regions live.js swaps, and the slot a slot page follows."""
    return {"stream_url": stream_url_for_console(url_for("admin.live.stream")),
            "regions": regions, "account_id": account_id, "shop_id": shop_id}


@bp.get("/agents")
@login_required
def agents() -> str:
    items, _ = AgentService(runtime().database).list(AgentFilters(limit=200))
    return render_template("agents.html", agents=items)


@bp.get("/imports")
@login_required
def imports() -> str:
    jobs = ImportService(runtime()).list(limit=20)
    settings = runtime().settings
    return render_template("imports.html", jobs=[import_jobs.import_progress(j)
                                                 for j in jobs],
                           session_gap=settings.session_gap,
                           review_default=settings.grouping_review,
                           review_available=settings.grouping_review_endpoint is not None)


@bp.get("/imports/<job_id>")
@login_required
def import_page(job_id: str) -> str:
    job = import_jobs.import_progress(ImportService(runtime()).get(job_id))
    with runtime().database.read() as db:
        errors = import_jobs.import_job_errors(db, job_id, limit=500)
    return render_template("import_job.html", job=job, errors=errors)


@bp.get("/deliveries")
@login_required
def deliveries() -> str:
    """The given-up webhook deliveries (newest first), each with a redeliver button."""
    with runtime().database.read() as db:
        failed = delivery_log(db, status="failed", limit=200, with_attempts=False)
    return render_template("deliveries.html", deliveries=failed)


@bp.post("/deliveries/<delivery_id>/redeliver")
@login_required
def redeliver_delivery(delivery_id: str) -> WerkzeugResponse:
    operator = console_identity()
    assert operator is not None
    body = Redelivery.model_validate(
        {"reason": request.form.get("reason") or "redelivered by operator"})
    redeliver(runtime(), delivery_id, actor=operator.actor, reason=body.reason)
    return redirect(url_for("admin.console.deliveries", redelivered=delivery_id))
