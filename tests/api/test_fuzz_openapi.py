"""Property-based fuzzing of the API from its own OpenAPI document (schemathesis).

Every documented operation gets up to 30 generated requests (valid and invalid) as an
admin and as a bot; no request may produce a 500 or break the slot invariant (checked
in the database afterwards). Bounded: well under two minutes on both backends.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from sqlalchemy import func, select

from app.api.auth import CLIENTS_KEY
from app.api.http import RUNTIME_KEY
from app.factory import create_app
from app.sessions.models import Session

# The document needs no database: the app's runtime is attached per test below.
fuzzed_app = create_app()
# The event stream never ends (tests/api/test_event_stream.py covers its bad input).
schema = schemathesis.openapi.from_wsgi("/openapi.json", fuzzed_app).exclude(
    path="/api/v1/events/stream")


@pytest.fixture
def wired_app(runtime):  # type: ignore[no-untyped-def]
    fuzzed_app.extensions[RUNTIME_KEY] = runtime
    fuzzed_app.extensions.pop(CLIENTS_KEY, None)
    yield fuzzed_app
    fuzzed_app.extensions.pop(RUNTIME_KEY, None)
    fuzzed_app.extensions.pop(CLIENTS_KEY, None)


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_request_breaks_the_api(case, wired_app, admin, bot, runtime):  # type: ignore[no-untyped-def]
    for caller in (admin, bot):
        response = case.call(headers=caller.headers())
        case.validate_response(response, checks=[not_a_server_error])
        assert response.status_code < 500, response.text
    with runtime.database.read() as db:
        doubled = db.execute(
            select(Session.account_id, Session.shop_id)
            .where(Session.status.in_(["ACTIVE", "TRANSFERRED"]))
            .group_by(Session.account_id, Session.shop_id)
            .having(func.count() > 1)
        ).all()
    assert doubled == [], f"slot invariant broken: {doubled}"
