"""Malformed and out-of-range paging parameters on every paginated admin endpoint (SPEC §8
"Bad input"): a cursor, limit, offset, sample or time the endpoint cannot use is a 422
problem naming the parameter — never a 500, never a 404 for a cursor."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.admin.conftest import Caller

INT64_MAX = 2**63 - 1
JOB = "<job_id>"  # replaced by a real job's id, so that a good value answers 200

OUT_OF_INT64 = [str(INT64_MAX + 1), "1" * 40, str(-(2**63) - 1)]
NOT_AN_INTEGER = ["abc", "1.5", "1e3", "0x10", "²", "--1", "\x00", "1 2"]
NOT_A_LIMIT = ["0", "-1", "201", *OUT_OF_INT64, *NOT_AN_INTEGER]


def opaque(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


INTEGER_CURSOR = ["0", "-1", *OUT_OF_INT64, *NOT_AN_INTEGER]
SESSION_CURSOR = ["abc", "!!!!", "\x00", "x" * 65, opaque("s-1"), opaque("s1.5"),
                  opaque(f"s{INT64_MAX + 1}"), opaque("t12"), opaque("s")]
JOB_CURSOR = ["imp_nope", "-1", str(INT64_MAX + 1), "\x00", "x" * 41]
AGENT_CURSOR = ["x" * 65]
TIMES = ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+00:01", "2020-13-01", "tomorrow",
         "99999-01-01"]

# path -> {parameter: values it must refuse}
PAGINATED: dict[str, dict[str, list[str]]] = {
    "/admin/api/sessions": {"after": SESSION_CURSOR, "limit": NOT_A_LIMIT, "from": TIMES,
                            "created_to": TIMES},
    "/admin/api/audit": {"after": INTEGER_CURSOR, "limit": NOT_A_LIMIT, "created_from": TIMES,
                         "to": TIMES},
    "/admin/api/agents": {"after": AGENT_CURSOR, "limit": NOT_A_LIMIT},
    "/admin/api/imports": {"after": JOB_CURSOR, "limit": NOT_A_LIMIT},
    f"/admin/api/imports/{JOB}/errors": {"offset": ["-1", *OUT_OF_INT64, *NOT_AN_INTEGER],
                                         "limit": ["0", "1001", *OUT_OF_INT64, "abc"]},
    "/admin/api/deliveries": {"after": INTEGER_CURSOR, "limit": NOT_A_LIMIT},
    "/admin/api/audit/verify": {"sample": ["0", "10001", *OUT_OF_INT64, "abc"],
                                "limit": ["0", "10001", *OUT_OF_INT64, "abc"], "from": TIMES},
}
# GET endpoints under /admin/api that take no paging parameters (one answer, or a short list)
NOT_PAGINATED = {
    "/admin/api/sessions/<session_id>", "/admin/api/sessions/<session_id>/audit/verify",
    "/admin/api/slots", "/admin/api/transfers", "/admin/api/imports/<job_id>",
    "/admin/api/clients", "/admin/api/stats",
    "/admin/api/events/stream",  # a stream, not pages; its cursor: tests/api/test_event_stream.py
}
CONSOLE_SEARCH = {"after": SESSION_CURSOR, "limit": NOT_A_LIMIT, "from": TIMES}

PARAMETERS = [(path, name) for path, params in PAGINATED.items() for name in params]


@pytest.fixture
def job_id(admin: Caller) -> str:
    upload = admin.http.post(
        "/admin/api/imports", headers=admin.headers(), content_type="text/csv",
        data=b"message_id,account_id,shop_id,sender_role,content,sent_at\n"
             b"m1,acc,shop,robot,hi,2024-01-01T00:00:00Z\n")
    assert upload.status_code == 202, upload.get_json()
    return str(upload.get_json()["job_id"])


def get(admin: Caller, path: str, job_id: str, **params: str) -> Any:
    return admin.http.get(path.replace(JOB, job_id), query_string=params,
                          headers=admin.headers())


def names_the_parameter(response: Any, name: str) -> bool:
    """The 422's field errors name the parameter (as for every invalid field)."""
    return name in {error.get("field") for error in response.get_json().get("errors", [])}


def test_every_admin_list_endpoint_is_classified(app: Flask):
    """A new GET endpoint must say whether it pages (and be fuzzed here) or not."""
    gets = {rule.rule for rule in app.url_map.iter_rules()
            if rule.rule.startswith("/admin/api/") and "GET" in (rule.methods or ())}
    paginated = {path.replace(JOB, "<job_id>") for path in PAGINATED}
    assert gets == paginated | NOT_PAGINATED


@pytest.mark.parametrize(("path", "name"), PARAMETERS, ids=[f"{p}?{n}" for p, n in PARAMETERS])
def test_a_bad_paging_parameter_is_a_422_naming_it(admin: Caller, job_id: str, path: str,
                                                   name: str):
    wrong = []
    for value in PAGINATED[path][name]:
        response = get(admin, path, job_id, **{name: value})
        if (response.status_code != 422 or response.mimetype != "application/problem+json"
                or not names_the_parameter(response, name)):
            wrong.append((value, response.status_code, response.get_json()))
    assert not wrong


def test_good_paging_parameters_still_answer(admin: Caller, job_id: str, open_session):
    for _ in range(3):
        open_session("AUTO_BARGAIN", shop=f"shop-{_}")
    first = get(admin, "/admin/api/sessions", job_id, limit="2").get_json()
    assert first["next"] is not None
    assert get(admin, "/admin/api/sessions", job_id, after=first["next"]).status_code == 200
    for path, params in (("/admin/api/audit", {"after": str(INT64_MAX), "limit": "200"}),
                         ("/admin/api/deliveries", {"after": "1", "limit": "1"}),
                         ("/admin/api/imports", {"after": job_id}),
                         (f"/admin/api/imports/{JOB}/errors", {"offset": str(INT64_MAX)}),
                         ("/admin/api/agents", {"after": "\x00"}),
                         ("/admin/api/sessions", {"from": "0001-01-01", "to": "9999-12-31"})):
        response = get(admin, path, job_id, **params)
        assert response.status_code == 200, (path, params, response.get_json())


@pytest.mark.parametrize("path", list(PAGINATED))
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_paging_parameter_value_makes_a_500(admin: Caller, job_id: str, path: str,
                                               data: st.DataObject):
    name = data.draw(st.sampled_from(sorted(PAGINATED[path])), label="parameter")
    value = data.draw(st.one_of(
        st.integers(min_value=-(2**80), max_value=2**80).map(str),
        st.text(st.characters(exclude_categories=("Cs",)), max_size=80),
        st.binary(max_size=48).map(lambda raw: base64.urlsafe_b64encode(raw).decode()),
        st.integers(min_value=-(2**70), max_value=2**70).map(lambda n: opaque(f"s{n}")),
    ), label="value")
    response = get(admin, path, job_id, **{name: value})
    assert response.status_code in (200, 422), (response.status_code, response.get_json())
    if response.status_code == 422:
        assert names_the_parameter(response, name), response.get_json()


def test_the_console_search_page_refuses_bad_paging_with_a_422_page(http, admin: Caller):
    from tests.admin.test_console import log_in

    log_in(http, admin.token)
    wrong = []
    for name, values in CONSOLE_SEARCH.items():
        for value in values:
            response = http.get("/admin/sessions", query_string={name: value})
            if response.status_code != 422 or response.mimetype != "text/html":
                wrong.append((name, value, response.status_code))
    assert not wrong
