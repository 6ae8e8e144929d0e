"""SPEC §5 rules on realistic counterpart messages: what must trigger and what must not."""

from __future__ import annotations

import csv
import io

import pytest

from app.detection.rules import ChatLine, default_rules, judge_conversation, judge_text, parse_rules
from tests.shared_data import TWCS_CSV

TWCS = TWCS_CSV


@pytest.mark.parametrize(("text", "intent", "urgency"), [
    ("转人工", "human_request", 2),
    ("你好，帮我转人工客服谢谢", "human_request", 2),
    ("我要找真人说话，别让机器人回我", "human_request", 2),
    ("叫你们店长出来", "human_request", 2),
    ("你是机器人吧？", "human_request", 2),
    ("收到的杯子碎了，我要退款", "after_sales", 2),
    ("尺码不对，怎么换货", "after_sales", 2),
    ("东西用了两天就坏了，售后在哪", "after_sales", 2),
    ("发错货了，我买的是黑色", "after_sales", 2),
    ("再不给我处理我就去12315投诉你们", "complaint", 1),
    ("给你们差评，骗子店铺", "complaint", 1),
    ("我要去消协举报", "complaint", 1),
    ("你在说什么啊，答非所问", "robot_failure", 2),
    ("我说了好几遍了，能不能说人话", "robot_failure", 2),
    ("Can I talk to a human please?", "human_request", 2),
    ("I want to speak with a representative", "human_request", 2),
    ("agent", "human_request", 2),
    ("Are you a bot?", "human_request", 2),
    ("I want a refund for this order", "after_sales", 2),
    ("The blender arrived broken, I want to return it", "after_sales", 2),
    ("You sent me the wrong size", "after_sales", 2),
    ("This is unacceptable, I will file a complaint", "complaint", 1),
    ("You don't understand what I'm asking", "robot_failure", 2),
    ("That's not what I asked", "robot_failure", 2),
    ("ＲＥＦＵＮＤ　ＮＯＷ", "after_sales", 2),  # full-width letters and space
])
def test_messages_that_need_a_human_trigger(text, intent, urgency):
    verdict = judge_text(text)
    assert verdict is not None, text
    assert (verdict.intent, verdict.urgency) == (intent, urgency)


@pytest.mark.parametrize("text", [
    # bargaining
    "能便宜点吗？最低多少钱",
    "太贵了，别家才卖89",
    "两件一起拍能给个优惠吗",
    "人工费这么贵？包邮的话我就拍了",
    "这个价格可以再少一点吗，诚心要",
    "你们这个是人工智能产品吗",
    "有没有真人实拍图，想看看上身效果",
    # a question about the policy before buying
    "如果不合适可以退货吗？",
    "支持七天无理由退货吗",
    "退货政策是怎样的",
    "买了之后能换吗",
    "售后有保障吗",
    # negated
    "不用转人工了，我自己看看",
    "我不会给差评的放心",
    # English
    "Can you do a better price if I buy three?",
    "Is the price negotiable?",
    "What's your return policy?",
    "Do you offer refunds?",
    "If it doesn't fit, can I return it?",
    "No need for a human, thanks",
    "Thanks, that answers my question",
    "ok",
])
def test_plain_bargaining_and_policy_questions_do_not_trigger(text):
    assert judge_text(text) is None, judge_text(text)


def test_the_most_urgent_rule_wins():
    verdict = judge_text("我要退款，不然就投诉你们")
    assert verdict.intent == "complaint" and verdict.urgency == 1


def lines(*pairs: tuple[str, str]) -> list[ChatLine]:
    return [ChatLine(pk=i + 1, message_id=f"m{i + 1}", sender_role=role, content=text)
            for i, (role, text) in enumerate(pairs)]


def test_robot_repeating_itself_is_a_failure_sign():
    convo = lines(
        ("counterpart", "这个有现货吗"),
        ("robot", "亲，您好，请问有什么可以帮您？"),
        ("counterpart", "有现货吗"),
        ("robot", "亲，您好，请问有什么可以帮您？"),
        ("counterpart", "？？？"),
    )
    verdict = judge_conversation(convo[-2:], convo)
    assert verdict is not None and verdict.trigger == "robot_failure"
    assert verdict.rule_id == "robot.repeat" and verdict.evidence == ["m2", "m4"]


def test_an_old_repetition_does_not_fire_again():
    convo = lines(
        ("robot", "亲，您好，请问有什么可以帮您？"),
        ("robot", "亲，您好，请问有什么可以帮您？"),
        ("counterpart", "好的"),
    )
    assert judge_conversation(convo[-1:], convo) is None


def test_short_acknowledgements_are_not_repetition():
    convo = lines(("robot", "好的"), ("counterpart", "嗯"), ("robot", "好的"),
                  ("counterpart", "那就这样"))
    assert judge_conversation(convo[-2:], convo) is None


def test_counterpart_asking_the_same_thing_three_times_is_a_failure_sign():
    convo = lines(
        ("counterpart", "什么时候发货"), ("robot", "亲，本店商品质量有保障哦"),
        ("counterpart", "什么时候发货"), ("robot", "亲，欢迎选购"),
        ("counterpart", "什么时候发货？"),
    )
    verdict = judge_conversation(convo[-1:], convo)
    assert verdict is not None and verdict.rule_id == "counterpart.repeat"


def test_robot_and_staff_messages_are_not_judged_as_requests():
    convo = lines(("robot", "如需退款请联系人工客服"), ("counterpart", "好的谢谢"))
    assert judge_conversation(convo, convo) is None


def test_rules_are_data_and_a_bad_rule_is_refused_by_name():
    book = default_rules()
    assert {r.intent for r in book.rules} >= {"human_request", "after_sales", "complaint",
                                              "robot_failure"}
    bad = {"rule": [{"id": "broken", "intent": "x", "trigger": "keyword", "urgency": 9,
                     "reason": "r", "patterns": ["x"]}],
           "robot_repeat": {}, "counterpart_repeat": {}}
    with pytest.raises(ValueError, match="broken"):
        parse_rules(bad)


@pytest.mark.skipif(not TWCS.exists(), reason="shared data not present")
def test_real_customer_tweets():
    text = TWCS.read_text(encoding="utf-8").replace("\r", " ")
    by_id = {r["tweet_id"]: r["text"] for r in csv.DictReader(io.StringIO(text))}
    must = {
        "6447": "after_sales",  # "... Refund my money."
        "2594": "human_request",  # "Want to speak to someone at corp ..."
        "3130": "complaint",  # "... unacceptable RUDE disgusting ..."
        "5119": "after_sales",  # "... One is broken."
    }
    for tweet_id, intent in must.items():
        verdict = judge_text(by_id[tweet_id])
        assert verdict is not None and verdict.intent == intent, (tweet_id, by_id[tweet_id])
    for tweet_id in ("5501", "3254"):  # "think I don't understand it", "Only complaint is"
        assert judge_text(by_id[tweet_id]) is None, by_id[tweet_id]
