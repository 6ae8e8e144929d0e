"""The rule matcher: loads `rules.toml` and judges counterpart messages (SPEC §5).

Pure functions over plain values: no database, no HTTP. The detection service
feeds it a session's new messages and acts on the verdict.
"""

from __future__ import annotations

import difflib
import functools
import re
import tomllib
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.sessions.enums import SenderRole, TransferTrigger

RULES_FILE = Path(__file__).with_name("rules.toml")


@dataclass(frozen=True)
class Rule:
    id: str
    intent: str
    language: str
    trigger: TransferTrigger
    urgency: int
    reason: str
    suggestion: str
    patterns: tuple[re.Pattern[str], ...]
    unless: tuple[re.Pattern[str], ...] = ()

    def match(self, text: str) -> str | None:
        """The matched fragment of normalised `text`, or None."""
        for pattern in self.patterns:
            found = pattern.search(text)
            if found:
                if any(u.search(text) for u in self.unless):
                    return None
                return found.group(0)
        return None


@dataclass(frozen=True)
class RepeatRule:
    """Near-identical messages from one side, `min_repeats` among the last `window`."""

    window: int
    min_repeats: int
    similarity: float
    min_length: int
    trigger: TransferTrigger
    urgency: int
    reason: str
    suggestion: str


@dataclass(frozen=True)
class RuleBook:
    rules: tuple[Rule, ...]
    robot_repeat: RepeatRule
    counterpart_repeat: RepeatRule


@dataclass
class ChatLine:
    """One stored message as the matcher sees it."""

    pk: int
    message_id: str
    sender_role: str
    content: str
    sender_id: str | None = None


@dataclass
class RuleVerdict:
    """A hit: transfer the session for this reason."""

    rule_id: str
    intent: str
    trigger: TransferTrigger
    urgency: int
    reason: str
    suggestion: str
    matched: str
    message_id: str | None
    evidence: list[str] = field(default_factory=list)

    def as_details(self) -> dict[str, Any]:
        return {"rule_id": self.rule_id, "intent": self.intent, "matched": self.matched,
                "message_id": self.message_id, "evidence": self.evidence}


def normalise(text: str) -> str:
    """Full-width to half-width, lower case, single spaces: one form for every pattern."""
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"\s+", " ", text).strip()


def _repeat_rule(raw: dict[str, Any]) -> RepeatRule:
    return RepeatRule(
        window=int(raw["window"]), min_repeats=int(raw["min_repeats"]),
        similarity=float(raw["similarity"]), min_length=int(raw["min_length"]),
        trigger=TransferTrigger(raw["trigger"]), urgency=int(raw["urgency"]),
        reason=raw["reason"], suggestion=raw["suggestion"],
    )


def parse_rules(raw: dict[str, Any]) -> RuleBook:
    """Build the rule book from parsed TOML; a bad rule fails loudly, naming its id."""
    rules = []
    for entry in raw.get("rule", []):
        rule_id = entry.get("id", "?")
        try:
            urgency = int(entry["urgency"])
            if not 1 <= urgency <= 4:
                raise ValueError(f"urgency {urgency} is not 1..4")
            rules.append(Rule(
                id=rule_id, intent=entry["intent"], language=entry.get("language", "any"),
                trigger=TransferTrigger(entry["trigger"]), urgency=urgency,
                reason=entry["reason"], suggestion=entry.get("suggestion", ""),
                patterns=tuple(re.compile(p) for p in entry["patterns"]),
                unless=tuple(re.compile(p) for p in entry.get("unless", [])),
            ))
        except (KeyError, ValueError, re.error) as exc:
            raise ValueError(f"transfer rule {rule_id!r} is invalid: {exc}") from exc
    return RuleBook(
        rules=tuple(rules),
        robot_repeat=_repeat_rule(raw["robot_repeat"]),
        counterpart_repeat=_repeat_rule(raw["counterpart_repeat"]),
    )


@functools.cache
def default_rules() -> RuleBook:
    with RULES_FILE.open("rb") as fh:
        return parse_rules(tomllib.load(fh))


def judge_text(text: str, book: RuleBook | None = None) -> RuleVerdict | None:
    """The most urgent rule one counterpart message hits, or None."""
    book = book or default_rules()
    clean = normalise(text)
    best: RuleVerdict | None = None
    for rule in book.rules:
        matched = rule.match(clean)
        if matched is not None and (best is None or rule.urgency < best.urgency):
            best = RuleVerdict(rule.id, rule.intent, rule.trigger, rule.urgency, rule.reason,
                               rule.suggestion, matched, None)
    return best


def _similar(a: str, b: str, threshold: float) -> bool:
    return a == b or difflib.SequenceMatcher(None, a, b).ratio() >= threshold


def repeated(lines: Sequence[ChatLine], rule: RepeatRule) -> list[ChatLine] | None:
    """The near-identical lines among the last `window` of `lines`, if there are enough."""
    recent = [(line, normalise(line.content)) for line in lines[-rule.window:]]
    recent = [(line, text) for line, text in recent if len(text) >= rule.min_length]
    for i, (line, text) in enumerate(recent):
        group = [line] + [o for o, t in recent[i + 1:] if _similar(text, t, rule.similarity)]
        if len(group) >= rule.min_repeats:
            return group
    return None


def judge_conversation(
    new: Sequence[ChatLine], recent: Sequence[ChatLine], book: RuleBook | None = None
) -> RuleVerdict | None:
    """Judge a session's new messages in the light of its recent ones (oldest first).

    Keywords run on each new counterpart message; repetition needs at least one of
    the repeated messages to be new, so an old repetition does not fire twice."""
    book = book or default_rules()
    best: RuleVerdict | None = None
    for line in new:
        if line.sender_role != SenderRole.COUNTERPART:
            continue
        verdict = judge_text(line.content, book)
        if verdict is not None and (best is None or verdict.urgency < best.urgency):
            verdict.message_id = line.message_id
            best = verdict
    if best is not None:
        return best
    new_pks = {line.pk for line in new}
    for role, rule in ((SenderRole.ROBOT, book.robot_repeat),
                       (SenderRole.COUNTERPART, book.counterpart_repeat)):
        lines = [line for line in recent if line.sender_role == role]
        group = repeated(lines, rule)
        if group and any(line.pk in new_pks for line in group):
            return RuleVerdict(
                rule_id=f"{role}.repeat", intent="robot_failure", trigger=rule.trigger,
                urgency=rule.urgency, reason=rule.reason, suggestion=rule.suggestion,
                matched=group[0].content[:200], message_id=group[-1].message_id,
                evidence=[line.message_id for line in group],
            )
    return None
