"""Live messages: accepted only from the party in control, while ACTIVE or TRANSFERRED."""

from __future__ import annotations

from sqlalchemy import select

from app.messages.models import Message


def stored(runtime) -> list[Message]:  # type: ignore[no-untyped-def]
    with runtime.database.read() as db:
        return list(db.execute(select(Message).order_by(Message.id)).scalars())


def test_messages_are_stored_and_deduplicated(bot, runtime):
    sid = bot.create("AUTO_BARGAIN")["session_id"]
    rows = [
        {"message_id": "m1", "sender_role": "counterpart", "content": "how much?",
         "sent_at": "2024-05-01T10:00:00+08:00"},
        {"message_id": "m2", "content": "12 yuan", "sent_at": "2024-05-01T10:00:05+08:00"},
        {"message_id": "m1", "sender_role": "counterpart", "content": "how much?",
         "sent_at": "2024-05-01T10:00:00+08:00"},
    ]
    first = bot.post(f"/api/v1/sessions/{sid}/messages", {"messages": rows})
    assert first.status_code == 200
    assert (first.get_json()["accepted"], first.get_json()["duplicates"]) == (2, 1)
    again = bot.post(f"/api/v1/sessions/{sid}/messages", {"messages": rows[:2]}).get_json()
    assert (again["accepted"], again["duplicates"]) == (0, 2)
    messages = stored(runtime)
    assert [(m.message_id, m.sender_role) for m in messages] == [("m1", "counterpart"),
                                                                 ("m2", "robot")]
    assert again["session"]["message_count"] == 2


def test_rows_without_id_get_a_stable_one(bot):
    sid = bot.create("AUTO_BARGAIN")["session_id"]
    row = {"content": "hello", "sent_at": "2024-05-01T10:00:00Z", "sender_role": "counterpart"}
    assert bot.post(f"/api/v1/sessions/{sid}/messages",
                    {"messages": [row]}).get_json()["accepted"] == 1
    assert bot.post(f"/api/v1/sessions/{sid}/messages",
                    {"messages": [row]}).get_json()["duplicates"] == 1


def test_row_errors_name_the_row_and_field_and_store_nothing(bot, runtime):
    sid = bot.create("AUTO_BARGAIN")["session_id"]
    response = bot.post(f"/api/v1/sessions/{sid}/messages", {"messages": [
        {"content": "ok"},
        {"content": "bad", "sent_at": "yesterday"},
        {"content": "other shop", "shop_id": "elsewhere"},
        {"content": "pretending", "sender_role": "human"},
    ]})
    assert response.status_code == 422
    fields = [e["field"] for e in response.get_json()["errors"]]
    assert "messages.1.sent_at" in fields
    assert stored(runtime) == []
    response = bot.post(f"/api/v1/sessions/{sid}/messages", {"messages": [
        {"content": "other shop", "shop_id": "elsewhere"},
        {"content": "pretending", "sender_role": "human"},
    ]})
    fields = [e["field"] for e in response.get_json()["errors"]]
    assert fields == ["messages.0.shop_id", "messages.1.sender_role"]
    assert bot.post(f"/api/v1/sessions/{sid}/messages", {"messages": []}).status_code == 422


def test_desk_posts_human_messages_once_transferred_and_the_bot_may_not(bot, desk, runtime):
    sid = bot.create("AUTO_BARGAIN")["session_id"]
    assert desk.post(f"/api/v1/sessions/{sid}/messages",
                     {"messages": [{"content": "hi"}]}).status_code == 404
    bot.post(f"/api/v1/sessions/{sid}/transfer", {"reason": "needs a person"})
    robot_talk = bot.post(f"/api/v1/sessions/{sid}/messages", {"messages": [{"content": "me"}]})
    assert robot_talk.status_code == 409
    assert robot_talk.get_json()["type"] == "/problems/not-in-control"
    answer = desk.post(f"/api/v1/sessions/{sid}/messages", {"messages": [
        {"content": "hello, I am Li", "sender_id": "agent-1"},
        {"content": "I want a refund", "sender_role": "customer"},
    ]}).get_json()
    assert answer["accepted"] == 2
    assert [m.sender_role for m in stored(runtime)] == ["human", "counterpart"]


def test_messages_refused_unless_active_or_transferred(bot, desk):
    sid = bot.create("AUTO_BARGAIN")["session_id"]
    bot.post(f"/api/v1/sessions/{sid}/pause")
    paused = bot.post(f"/api/v1/sessions/{sid}/messages", {"messages": [{"content": "x"}]})
    assert paused.status_code == 409 and paused.get_json()["current_status"] == "PAUSED"
    human = desk.create("MANUAL_CUSTOMER_SERVICE", shop="s2")["session_id"]
    desk.post(f"/api/v1/sessions/{human}/complete")
    done = desk.post(f"/api/v1/sessions/{human}/messages", {"messages": [{"content": "x"}]})
    assert done.status_code == 409
