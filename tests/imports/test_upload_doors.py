"""The upload has two doors, `POST /api/v1/imports` and the console's `POST /admin/api/imports`,
and one adapter behind them (`app.api.uploads`): the same options, read the same way,
checked the same way."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest

from app.imports.service import ImportService
from tests.imports.helpers import as_ndjson, conversation

DOORS = ["/api/v1/imports", "/admin/api/imports"]
BODY = as_ndjson(conversation("s1", datetime(2024, 5, 1, 9, 0, tzinfo=UTC), "cr"))


@pytest.fixture(autouse=True)
def _jobs_end_with_the_test(runtime):
    """An accepted upload starts its job: let it end before the test's database goes."""
    yield
    from tasks.imports import wait_eager

    for job in ImportService(runtime).list():
        wait_eager(job.job_id, 60)


@pytest.mark.parametrize("path", DOORS)
@pytest.mark.parametrize("query,name", [
    ("format=xml", "format"), ("format=JSON", "format"), ("encoding=latin-1", "encoding"),
    ("encoding=utf8", "encoding"), ("filename=" + "x" * 256, "filename"),
    ("session_gap=0", "session_gap"), ("grouping=topics", "grouping")])
def test_both_doors_refuse_the_same_bad_options_naming_the_parameter(admin, path, query, name):
    response = admin.http.post(f"{path}?{query}", data=BODY,
                               headers=admin.headers({"Content-Type": "application/x-ndjson"}))
    assert response.status_code == 422, response.get_json()
    assert response.mimetype == "application/problem+json"
    assert name in [e["field"] for e in response.get_json()["errors"]]


@pytest.mark.parametrize("path", DOORS)
def test_both_doors_take_the_file_name_from_the_query(admin, path):
    response = admin.http.post(f"{path}?filename=history.ndjson", data=BODY,
                               headers=admin.headers({"Content-Type": "application/x-ndjson"}))
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["filename"] == "history.ndjson"


@pytest.mark.parametrize("path", DOORS)
def test_both_doors_take_grouping_options_as_form_fields_beside_the_file(admin, path):
    response = admin.http.post(
        f"{path}?session_gap=60", headers=admin.headers(), content_type="multipart/form-data",
        data={"file": (io.BytesIO(BODY), "history.ndjson"), "session_gap": "7200",
              "grouping": "threads", "review": ""})
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert (job["filename"], job["session_gap"], job["grouping"]) == (
        "history.ndjson", 7200, "threads")  # a field wins over the query


@pytest.mark.parametrize("path", DOORS)
def test_both_doors_refuse_a_bad_form_field_naming_it(admin, path):
    response = admin.http.post(
        path, headers=admin.headers(), content_type="multipart/form-data",
        data={"file": (io.BytesIO(BODY), "history.ndjson"), "grouping": "topics"})
    assert response.status_code == 422, response.get_json()
    assert "grouping" in [e["field"] for e in response.get_json()["errors"]]
