"""HTTP doors of the history import (SPEC §8), admin only.

    POST /api/v1/imports            multipart `file`, or the raw JSON/NDJSON/CSV (or gzip)
                                    body; `?format=` and `?encoding=` override detection;
                                    `?session_gap=`, `?grouping=`, `?review=`: grouping
                                    202 with the job (status `queued`).
    GET  /api/v1/imports/<job_id>   status, counts, first row errors, times
    GET  /api/v1/imports            jobs, newest first (`limit`, `after`, `status`)

The upload itself — body, size bound, options, staging, start — is `app.api.uploads`,
shared with the console's upload (`POST /admin/api/imports`).
"""

from __future__ import annotations

from flask import Blueprint, Response, url_for
from pydantic import BaseModel, ConfigDict, Field

from app.api.auth import current_client, require_roles
from app.api.http import parse_query, respond, runtime
from app.api.openapi import documented
from app.api.uploads import UploadQuery, receive_upload
from app.errors import NotFound, ValidationFailed
from app.imports.lifecycle import ImportJobView
from app.imports.service import ImportService
from app.validation import BoundaryModel

bp = Blueprint("imports", __name__)


class JobListQuery(BoundaryModel):
    model_config = ConfigDict(extra="ignore")

    limit: int = Field(default=50, ge=1, le=500)
    after: str | None = Field(default=None, max_length=40, description="a job_id")
    status: str | None = Field(default=None, max_length=24)


class JobList(BaseModel):
    items: list[ImportJobView]
    next: str | None


@bp.post("/api/v1/imports")
@documented(
    summary="Upload a chat export for history import",
    description="multipart/form-data with a `file` part, or the file itself as the body "
                "(JSON array, NDJSON, CSV with header; UTF-8, UTF-8 BOM or GBK; optionally "
                "gzip). Answers at once; follow the job with GET /api/v1/imports/{job_id}.",
    tags=("imports",), query=UploadQuery, responses={202: ImportJobView},
    body_content_types=("multipart/form-data", "application/json", "application/x-ndjson",
                        "text/csv", "application/gzip"),
    errors=(401, 403, 413, 422),
)
@require_roles("admin")
def upload() -> Response:
    job = receive_upload(actor=f"client:{current_client().client_id}")
    location = url_for("imports.get_job", job_id=job.job_id)
    return respond(job, status=202, headers={"Location": location})


@bp.get("/api/v1/imports/<job_id>")
@documented(summary="An import job: status, counts, first row errors", tags=("imports",),
            responses={200: ImportJobView}, errors=(401, 403, 404))
@require_roles("admin")
def get_job(job_id: str) -> Response:
    return respond(ImportService(runtime()).get(job_id))


@bp.get("/api/v1/imports")
@documented(summary="Import jobs, newest first", tags=("imports",), query=JobListQuery,
            responses={200: JobList}, errors=(401, 403))
@require_roles("admin")
def list_jobs() -> Response:
    query = parse_query(JobListQuery)
    try:
        items = ImportService(runtime()).list(limit=query.limit + 1, before=query.after,
                                              status=query.status)
    except NotFound:
        raise ValidationFailed("unknown cursor", [{"field": "after", "message":
                                                   "no such import job"}]) from None
    more = len(items) > query.limit
    items = items[:query.limit]
    return respond(JobList(items=items, next=items[-1].job_id if more else None))
