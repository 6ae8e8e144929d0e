"""The history upload over HTTP, one adapter for both doors (`POST /api/v1/imports` and
the console's `POST /admin/api/imports`): the door checks who calls and renders the job,
`receive_upload` does the rest the same way for both.

The body is a multipart `file` part or the file itself; `?format=`, `?encoding=` and
`?filename=` say how to read it, `?session_gap=`, `?grouping=`, `?review=` how to group
it (in a multipart body the grouping options may also come as fields beside the file,
as the console's form sends them; a field wins over the query). The body is streamed
into the database in 1 MiB pieces, so the web server's disk is never part of the
pipeline. An upload is bounded by MAX_UPLOAD_BYTES (not the smaller MAX_REQUEST_BYTES of
other requests): a declared Content-Length past it is refused before a byte is read, and
a body without one (chunked) is counted as it streams in; either way the answer is 413
and nothing of it is kept.
"""

from __future__ import annotations

from typing import IO, Any, Literal

from flask import request
from pydantic import ConfigDict, Field, ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from app.api.http import parse_query, runtime
from app.api.problems import validation_problem
from app.errors import UploadTooLarge, ValidationFailed
from app.imports.lifecycle import ImportJobView
from app.imports.service import ImportService
from app.imports.upload import MAX_SESSION_GAP
from app.validation import BoundaryModel


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


def receive_upload(*, actor: str) -> ImportJobView:
    """Stage the request's upload as a queued job and start it: the job as created (202
    for the door to render). Past MAX_UPLOAD_BYTES, declared or counted, UploadTooLarge
    (413); bad options or an empty upload, ValidationFailed (422)."""
    limit = runtime().settings.max_upload_bytes
    request.max_content_length = limit  # for this request only, before anything reads it
    if request.content_length is not None and request.content_length > limit:
        raise UploadTooLarge(limit)
    try:
        return _receive(actor)
    except RequestEntityTooLarge:  # werkzeug's own count (multipart parsing, stream)
        raise UploadTooLarge(limit) from None


def _receive(actor: str) -> ImportJobView:
    query = parse_query(UploadQuery)
    stream: IO[bytes]
    filename = query.filename
    if request.mimetype == "multipart/form-data":
        query = _with_form_options(query)
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
                             encoding=query.encoding, actor=actor, **query.options())
    runtime().dispatcher.start_import(job.job_id)
    return job


def _with_form_options(query: UploadQuery) -> UploadQuery:
    """The query with the grouping options sent as form fields beside the file."""
    options = GroupingQuery.model_fields
    fields = {k: v for k, v in request.form.items() if k in options and v != ""}
    if not fields:
        return query
    try:
        return UploadQuery.model_validate({**query.model_dump(exclude_none=True), **fields})
    except ValidationError as exc:
        raise validation_problem(exc, where="form") from None
