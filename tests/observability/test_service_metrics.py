"""The metrics recorded where the work happens, in one process (both backends): fence
rejections, webhook outcomes and lag, sweep runs and rows, the slot-lock wait."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import update

from app.db import utcnow
from app.delivery.service import deliver_webhooks
from app.errors import FenceRejected
from app.runtime import build_runtime, set_runtime
from app.sessions.models import Session
from app.sessions.slot import SlotFence
from tests.delivery.receiver import WebhookReceiver
from tests.delivery.test_webhooks import create, make_client, subscribe


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.services  # two write transactions at once: row locks (SQLite has none)
def test_a_refused_fence_is_counted(runtime):
    before = value("autosession_fence_rejections_total")
    with runtime.database.unit_of_work() as stale_uow:
        stale = SlotFence(stale_uow.session, "acc", "fenced-slot")
        with runtime.database.unit_of_work() as fresh_uow:
            SlotFence(fresh_uow.session, "acc", "fenced-slot").advance("ses_fresh")
            fresh_uow.commit()
        with pytest.raises(FenceRejected):
            stale.advance("ses_stale")
    assert value("autosession_fence_rejections_total") - before == 1


def test_slot_operations_record_their_lock_wait(runtime):
    before = value("autosession_slot_lock_wait_seconds_count")
    make_client(runtime, "bot-w", "bot")
    for shop in ("w1", "w2", "w3"):
        create(runtime, "bot-w", shop=shop)
    assert value("autosession_slot_lock_wait_seconds_count") - before == 3


@pytest.fixture
def two_attempts(backend, tmp_path, runtime):
    settings = backend.settings(tmp_path, webhook_retry_base=0.1, webhook_max_attempts=2,
                                webhook_timeout=2, webhook_allow_private=True)
    rt = build_runtime(settings)
    rt._schema_checked = True
    set_runtime(rt)
    try:
        yield rt
    finally:
        set_runtime(runtime)
        rt.close()


def test_webhook_attempts_are_counted_by_outcome_with_the_delivery_lag(two_attempts):
    rt = two_attempts
    outcomes = ("delivered", "retry", "given_up")
    before = {o: value("autosession_webhook_deliveries_total", outcome=o) for o in outcomes}
    lag_before = value("autosession_webhook_delivery_lag_seconds_count")
    make_client(rt, "bot-h", "bot")
    with WebhookReceiver() as receiver:
        receiver.fail_first["bad"] = 100
        subscribe(rt, "bot-h", receiver.url)
        create(rt, "bot-h", shop="good")
        create(rt, "bot-h", shop="bad")
        end = time.monotonic() + 15
        while time.monotonic() < end:
            deliver_webhooks(rt, time_budget=5)
            if value("autosession_webhook_deliveries_total", outcome="given_up") > before[
                    "given_up"]:
                break
            time.sleep(0.15)
    delta = {o: value("autosession_webhook_deliveries_total", outcome=o) - before[o]
             for o in outcomes}
    assert delta == {"delivered": 1, "retry": 1, "given_up": 1}
    assert value("autosession_webhook_delivery_lag_seconds_count") - lag_before == 1


def test_a_sweep_run_records_its_time_and_what_it_did(runtime):
    from tasks.sweeps import sweep_sessions_task

    make_client(runtime, "bot-s", "bot")
    due = create(runtime, "bot-s", shop="sweep-1")
    with runtime.database.unit_of_work() as uow:
        uow.session.execute(update(Session).where(Session.session_id == due.session_id)
                            .values(deadline_at=utcnow() - timedelta(minutes=1)))
        uow.commit()
    runs = value("autosession_sweep_duration_seconds_count", sweep="sessions")
    timed_out = value("autosession_sweep_rows_total", sweep="sessions", outcome="timed_out")
    assert sweep_sessions_task()["timed_out"] == 1
    assert value("autosession_sweep_duration_seconds_count", sweep="sessions") - runs == 1
    assert value("autosession_sweep_rows_total", sweep="sessions",
                 outcome="timed_out") - timed_out == 1
