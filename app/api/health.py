"""`/healthz` (the process answers) and `/readyz` (its database and Redis answer)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response
from sqlalchemy import text

from app.api.http import respond, runtime
from app.api.openapi import documented
from app.api.problems import problem_response
from app.api.schemas import Health

log = logging.getLogger(__name__)
bp = Blueprint("health", __name__)


@bp.get("/healthz")
@documented(summary="Liveness: the process answers", tags=("health",), responses={200: Health})
def healthz() -> Response:
    return respond(Health(status="ok"))


@bp.get("/readyz")
@documented(summary="Readiness: the database and Redis answer (503 when one does not)",
            tags=("health",), responses={200: Health}, errors=(503,))
def readyz() -> Response:
    rt = runtime()
    checks: dict[str, str] = {}
    try:
        with rt.database.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready; the detail stays in the log
        log.warning("readyz: database check failed: %s", exc.__class__.__name__)
        checks["database"] = "unavailable"
    if rt.redis is None:
        checks["redis"] = "not configured (embedded mode)"
    else:
        try:
            rt.redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            log.warning("readyz: redis check failed: %s", exc.__class__.__name__)
            checks["redis"] = "unavailable"
    if "unavailable" in checks.values():
        down = ", ".join(k for k, v in checks.items() if v == "unavailable")
        return problem_response(503, "Not ready", f"not ready: {down} unavailable",
                                type="/problems/not-ready", headers={"Retry-After": "5"},
                                checks=checks)
    return respond(Health(status="ready", checks=checks))
