"""HTTP doors of the history import (SPEC §8), admin only.

    POST /api/v1/imports            multipart `file`, or the raw JSON/NDJSON/CSV (or gzip)
                                    body; `?format=` and `?encoding=` override detection;
                                    `?session_gap=`, `?grouping=`, `?review=`: grouping
                                    202 with the job (status `queued`).
    GET  /api/v1/imports/<job_id>   status, counts, first row errors, times
    GET  /api/v1/imports            jobs, newest first (`limit`, `after`, `status`)

The body is streamed into the database in 1 MiB pieces; the workers take it from
there, so the web server's disk is never part of the pipeline. An upload is bounded by
MAX_UPLOAD_BYTES (not the smaller MAX_REQUEST_BYTES of other requests): a declared
Content-Length past it is refused before a byte is read, and a body without one
(chunked) is counted as it streams in; either way the answer is 413 and nothing of it
is kept (`bounded_upload`, shared with the console's upload).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import IO, Any, Literal

from flask import Blueprint, Response, request, url_for
from pydantic import BaseModel, ConfigDict, Field
from werkzeug.exceptions import RequestEntityTooLarge

from app.api.auth import current_client, require_roles
from app.api.http import parse_query, respond, runtime
from app.api.openapi import documented
from app.errors import NotFound, ValidationFailed
from app.imports.lifecycle import ImportJobView
from app.imports.service import ImportService
from app.imports.upload import MAX_SESSION_GAP, UploadTooLarge
from app.validation import BoundaryModel

bp = Blueprint("imports", __name__)


def bounded_upload[**P](view: Callable[P, Response]) -> Callable[P, Response]:
    """An upload view: its body may reach MAX_UPLOAD_BYTES (`request.max_content_length`
    is raised for this request only, before anything reads the body); past it — declared
    or counted while streaming, multipart or raw — the answer is 413 problem+json."""

    @functools.wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Response:
        limit = runtime().settings.max_upload_bytes
        request.max_content_length = limit
        if request.content_length is not None and request.content_length > limit:
            raise UploadTooLarge(limit)
        try:
            return view(*args, **kwargs)
        except RequestEntityTooLarge:  # werkzeug's own count (multipart parsing, stream)
            raise UploadTooLarge(limit) from None

    return wrapper


class GroupingQuery(BoundaryModel):
    """An upload's grouping options (SPEC §4); unset: SESSION_GAP, `auto`, GROUPING_REVIEW."""

    model_config = ConfigDict(extra="ignore")

    session_gap: int | None = Field(
        default=None, ge=1, le=MAX_SESSION_GAP, strict=False,
        description="seconds of silence that start a new conversation (gap rule)")
    grouping: Literal["auto", "threads", "gap"] | None = Field(
        default=None, description="auto: threading fields where rows have them, the gap "
        "rule for the rest; threads: threading fields alone; gap: the gap rule alone")
    review: bool | None = Field(
        default=None, description="ask the LLM to review ambiguous gap-rule boundaries")

    def options(self) -> dict[str, Any]:
        return {"session_gap": self.session_gap, "grouping": self.grouping,
                "review": self.review}


class UploadQuery(GroupingQuery):
    model_config = ConfigDict(extra="ignore")

    format: Literal["auto", "json", "ndjson", "csv"] = "auto"
    encoding: Literal["auto", "utf-8", "utf-8-sig", "gbk"] = "auto"
    filename: str | None = Field(default=None, max_length=255)


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
@bounded_upload
def upload() -> Response:
    query = parse_query(UploadQuery)
    stream: IO[bytes]
    filename = query.filename
    if request.mimetype == "multipart/form-data":
        part = request.files.get("file")
        if part is None:
            raise ValidationFailed("send the export as the multipart part named 'file'",
                                   [{"field": "file", "message": "missing"}])
        stream = part.stream
        filename = filename or part.filename
    else:
        stream = request.stream
    service = ImportService(runtime())
    job = service.create_job(stream, filename=filename, format=query.format,
                             encoding=query.encoding,
                             actor=f"client:{current_client().client_id}", **query.options())
    runtime().dispatcher.start_import(job.job_id)
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
