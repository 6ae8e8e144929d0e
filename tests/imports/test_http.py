"""POST/GET /api/v1/imports: admin only; multipart or raw body; the job answers at once."""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime

import pytest

from app.errors import ValidationFailed
from app.imports.service import ImportService
from tests.imports.helpers import as_csv, as_ndjson, conversation, gz

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
ROWS = conversation("s1", T0, "crch") + conversation("s2", T0, "cr")


def wait_for(admin, job_id: str, timeout: float = 60.0) -> dict:
    from tasks.imports import wait_eager

    wait_eager(job_id, timeout)
    deadline = time.monotonic() + timeout
    while True:
        body = admin.get(f"/api/v1/imports/{job_id}").get_json()
        if body["status"] in ("succeeded", "partially_succeeded", "failed"):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.1)


@pytest.fixture(autouse=True)
def _eager_only():
    from tasks.celery_app import celery

    if not celery.conf.task_always_eager:
        pytest.skip("runs the pipeline in-process (embedded default)")


def test_multipart_upload_answers_202_with_a_job_that_finishes(admin):
    data = as_csv(ROWS) + b"acc-1,s3,robot,r,bad,yesterday\n"
    response = admin.http.post(
        "/api/v1/imports", headers=admin.headers(),
        data={"file": (io.BytesIO(data), "history.csv")}, content_type="multipart/form-data")
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert job["status"] in ("queued", "running", "succeeded", "partially_succeeded")
    assert response.headers["Location"].endswith(job["job_id"])
    done = wait_for(admin, job["job_id"])
    assert done["status"] == "partially_succeeded" and done["filename"] == "history.csv"
    assert (done["total_rows"], done["inserted"], done["invalid"], done["sessions_created"]) == (
        7, 6, 1, 2)
    assert done["errors"] == [{"line": 8, "error": done["errors"][0]["error"]}]
    assert "sent_at" in done["errors"][0]["error"]
    for key in ("processed", "duplicates", "sessions_updated", "conflicts", "created_at",
                "started_at", "finished_at"):
        assert key in done


def test_raw_gzip_ndjson_body_and_the_job_list(admin):
    response = admin.http.post("/api/v1/imports?format=ndjson", data=gz(as_ndjson(ROWS)),
                               headers=admin.headers({"Content-Type": "application/gzip"}))
    assert response.status_code == 202
    done = wait_for(admin, response.get_json()["job_id"])
    assert (done["status"], done["inserted"]) == ("succeeded", 6)
    listing = admin.get("/api/v1/imports").get_json()
    assert [j["job_id"] for j in listing["items"]] == [done["job_id"]]
    assert listing["next"] is None


def test_only_admins_may_import(bot, desk, http):
    assert http.post("/api/v1/imports", data=b"[]").status_code == 401
    for caller in (bot, desk):
        response = caller.http.post("/api/v1/imports", data=as_ndjson(ROWS),
                                    headers=caller.headers())
        assert response.status_code == 403
        assert response.headers["Content-Type"].startswith("application/problem+json")


def test_bad_requests_are_problems(admin):
    empty = admin.http.post("/api/v1/imports", data=b"", headers=admin.headers())
    assert empty.status_code == 422
    unknown = admin.http.post("/api/v1/imports?format=xml", data=b"x", headers=admin.headers())
    assert unknown.status_code == 422
    # the one field-error shape of every 422: {"field", "message"}
    [error] = unknown.json["errors"]
    assert error["field"] == "format" and error["message"]
    assert "error" not in error
    assert admin.get("/api/v1/imports/imp_nope").status_code == 404


@pytest.mark.parametrize("option", ["format", "encoding"])
def test_an_unknown_upload_option_is_a_field_error_whatever_the_door(runtime, option):
    with pytest.raises(ValidationFailed) as refused:
        ImportService(runtime).create_job(io.BytesIO(b"[]"), **{option: "xml"})
    [error] = refused.value.extra["errors"]
    assert error == {"field": option, "message": error["message"]}
    assert error["message"].startswith("use one of")
