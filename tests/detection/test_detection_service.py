"""Detection on live messages of ACTIVE robot sessions, and the LLM path against a real
chat-completions server on 127.0.0.1 (no monkeypatching)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from itertools import count

import pytest
from sqlalchemy import select

from app.detection.service import analyse_with_llm, detect_session
from app.messages.service import LiveMessage
from app.runtime import build_runtime, set_runtime
from app.transfers.models import Transfer
from tests.detection.helpers import settled
from tests.detection.llm_server import ChatCompletionsServer
from tests.sessions.helpers import ask, audit_rows, status_of

_ids = count(1)


def say(service, session_id, *pairs):
    """Record the messages and wait for the detection they started (in the background)."""
    msgs = [LiveMessage(message_id=f"msg-{next(_ids)}", sender_role=role, content=text,
                        sent_at=datetime.now(UTC), sender_id="buyer-9" if role == "counterpart"
                        else "bot-1") for role, text in pairs]
    outcome = service.record_messages(session_id, msgs, actor="bot")
    settled()
    return outcome


def transfers(runtime, session_id):
    with runtime.database.read() as db:
        return list(db.execute(select(Transfer).where(Transfer.session_id == session_id)
                               .order_by(Transfer.id)).scalars())


def test_request_for_a_person_transfers_the_robot_session_with_full_context(runtime, service):
    robot = ask(service, "AUTO_BARGAIN", task_type="negotiation", owner_id="bot-1",
                context={"offer": 95}).session
    say(service, robot.session_id, ("robot", "亲，这款最低95元哦"),
        ("counterpart", "算了，帮我转人工"))
    assert status_of(service, robot.session_id) == "TRANSFERRED"
    (t,) = transfers(runtime, robot.session_id)
    assert (t.trigger, t.urgency, t.status) == ("keyword", 2, "PENDING")
    assert t.task_state["detection"]["rule_id"] == "zh.human_request"
    assert t.task_state["context"] == {"offer": 95}
    assert t.customer_info == {"account_id": "acc-1", "shop_id": "shop-1",
                               "counterpart_ids": ["buyer-9"]}
    assert t.suggestion and [m["content"] for m in t.history["recent"]] == [
        "亲，这款最低95元哦", "算了，帮我转人工"]
    last = audit_rows(runtime, robot.session_id)[-1]
    assert (last.operation, last.actor, last.to_status) == (
        "transfer", "system:detector", "TRANSFERRED")


def test_bargaining_talk_leaves_the_session_alone(runtime, service):
    robot = ask(service, "AUTO_BARGAIN").session
    say(service, robot.session_id, ("counterpart", "能便宜点吗？别家才卖89"),
        ("robot", "亲，已经是最低价了"), ("counterpart", "那包邮吗"))
    assert status_of(service, robot.session_id) == "ACTIVE"
    assert transfers(runtime, robot.session_id) == []


def test_a_message_is_judged_once(runtime, service):
    robot = ask(service, "AUTO_BARGAIN").session
    say(service, robot.session_id, ("counterpart", "好的"))
    assert detect_session(runtime, robot.session_id).examined == 0  # the hook already did


def test_human_sessions_are_not_watched(runtime, service):
    human = ask(service, "MANUAL_CUSTOMER_SERVICE").session
    say(service, human.session_id, ("counterpart", "我要投诉"))
    assert status_of(service, human.session_id) == "ACTIVE"
    assert transfers(runtime, human.session_id) == []


def test_robot_repeating_itself_transfers_with_robot_failure(runtime, service):
    robot = ask(service, "AUTO_FOLLOW_UP").session
    say(service, robot.session_id, ("counterpart", "我的快递到哪了"),
        ("robot", "亲，请提供您的订单号哦"), ("counterpart", "123456"))
    say(service, robot.session_id, ("robot", "亲，请提供您的订单号哦"))
    assert status_of(service, robot.session_id) == "ACTIVE"  # robot lines alone run nothing
    say(service, robot.session_id, ("counterpart", "？？"))
    (t,) = transfers(runtime, robot.session_id)
    assert t.trigger == "robot_failure"


@pytest.fixture
def llm(backend, tmp_path, runtime):
    """A runtime whose settings point at a live chat-completions server on loopback."""
    with ChatCompletionsServer() as server:
        settings = backend.settings(tmp_path, llm_base_url=server.base_url,
                                    llm_model="test-model", llm_api_key="sk-test",
                                    llm_timeout=1)
        rt = build_runtime(settings)
        rt._schema_checked = True
        set_runtime(rt)
        try:
            yield server, rt
        finally:
            set_runtime(runtime)
            rt.close()


NEUTRAL = ("counterpart", "这个东西跟图片差距也太大了吧")  # no rule hits this


def test_llm_verdict_transfers_when_the_rules_are_silent(llm):
    server, rt = llm
    robot = ask(rt.sessions, "AUTO_BARGAIN").session
    say(rt.sessions, robot.session_id, ("robot", "亲，有什么可以帮您"), NEUTRAL)
    assert status_of(rt.sessions, robot.session_id) == "TRANSFERRED"
    (t,) = transfers(rt, robot.session_id)
    assert (t.trigger, t.urgency, t.reason) == ("llm", 1, "客户对质量不满，需要人工")
    assert t.suggestion == "先道歉，再核实订单"
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "test-model"
    assert "CUSTOMER: 这个东西跟图片差距也太大了吧" in req["body"]["messages"][-1]["content"]


def test_llm_saying_no_leaves_the_session_active(llm):
    server, rt = llm
    server.mode = "calm"
    robot = ask(rt.sessions, "AUTO_BARGAIN").session
    say(rt.sessions, robot.session_id, NEUTRAL)
    assert len(server.requests) == 1
    assert status_of(rt.sessions, robot.session_id) == "ACTIVE"


@pytest.mark.parametrize("mode", ["slow", "garbage", "error"])
def test_llm_failure_leaves_the_rules_verdict_standing_and_is_logged(llm, mode, caplog):
    server, rt = llm
    server.mode = mode
    robot = ask(rt.sessions, "AUTO_BARGAIN").session
    with caplog.at_level(logging.WARNING, logger="app.detection.service"):
        say(rt.sessions, robot.session_id, NEUTRAL)
    assert len(server.requests) == 1
    assert status_of(rt.sessions, robot.session_id) == "ACTIVE"
    assert transfers(rt, robot.session_id) == []
    assert any("rules' verdict stands" in r.getMessage() for r in caplog.records)


def test_rules_hit_does_not_ask_the_llm(llm):
    server, rt = llm
    robot = ask(rt.sessions, "AUTO_BARGAIN").session
    say(rt.sessions, robot.session_id, ("counterpart", "I want a refund"))
    assert server.requests == []
    assert transfers(rt, robot.session_id)[0].trigger == "keyword"


def test_llm_task_runs_through_celery(llm):
    from tasks.detection import analyse_llm_task

    server, rt = llm
    server.mode = "calm"
    robot = ask(rt.sessions, "AUTO_BARGAIN").session
    result = analyse_llm_task.apply(args=[robot.session_id]).get()
    assert result == {"session_id": robot.session_id, "skipped": None, "transfer_id": None}
    server.mode = "good"
    assert analyse_with_llm(rt, robot.session_id).transfer is not None
