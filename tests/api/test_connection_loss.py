"""A database connection the server dropped: the request that meets it gets a clear,
retryable 503 (never a 500 with a trace), and the retry is answered normally."""

from __future__ import annotations

import pytest
from freezegun import freeze_time

from tests.sessions.helpers import kill, pooled_connection_ids

pytestmark = pytest.mark.services


def test_a_read_on_a_dropped_connection_is_503_and_the_retry_works(backend, runtime, bot):
    session_id = bot.create("AUTO_BARGAIN")["session_id"]
    # frozen clock: however slow the machine, the connections stay inside the ping window
    with freeze_time():
        for conn_id in pooled_connection_ids(runtime):
            kill(backend, conn_id)
        lost = bot.get(f"/api/v1/sessions/{session_id}")
    assert lost.status_code == 503
    assert lost.mimetype == "application/problem+json"
    assert lost.headers["Retry-After"] == "1"
    problem = lost.get_json()
    assert problem["type"] == "/problems/unavailable"
    assert problem["trace_id"]
    assert "Lost connection" not in lost.get_data(as_text=True)  # no driver text leaks

    again = bot.get(f"/api/v1/sessions/{session_id}")
    assert again.status_code == 200
    assert again.get_json()["session_id"] == session_id
