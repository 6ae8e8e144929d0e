"""The rule matcher: loads `rules.toml` and judges counterpart messages (SPEC §5).

Pure functions over plain values: no database, no HTTP. The detection service
feeds it a session's new messages and acts on the verdict.

Cost is bounded whatever the text (SPEC §5): a rule reads at most an excerpt of a
long message (`KEYWORD_TEXT_LIMIT`, `COMPARED_TEXT_LIMIT` characters), patterns are
checked on load to have no unbounded or nested repetition, and repetition is
measured with a bit-parallel LCS whose cost depends on the lengths only, never on
the content (difflib's matcher was super-linear on crafted near-identical texts).
"""

from __future__ import annotations

import functools
import re
import re._parser as sre_parse
import tomllib
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.sessions.enums import SenderRole
from app.transfers.enums import TransferTrigger

RULES_FILE = Path(__file__).with_name("rules.toml")

# The characters of one message a rule reads. Chat messages are far shorter; a longer
# one is read as its head and tail (3/4 and 1/4 of the limit), where a request for a
# person or a refund sits after a pasted order or log.
KEYWORD_TEXT_LIMIT = 4096
# The characters of each message the repetition rules compare (head and tail too).
COMPARED_TEXT_LIMIT = 1024
# Patterns may not repeat without bound nor repeat groups, and the product of their
# {m,n} repeats is capped: a search then backtracks a bounded amount per position, so
# it is linear in the text (checked on load; `compile_pattern`).
MAX_PATTERN_WAYS = 256


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


def excerpt(text: str, limit: int) -> str:
    """`text` if it has at most `limit` characters, else its head and tail joined by a
    space (3/4 and 1/4 of `limit`)."""
    if len(text) <= limit:
        return text
    tail = limit // 4
    return f"{text[:limit - tail - 1]} {text[len(text) - tail:]}"


def normalised_excerpt(text: str, limit: int) -> str:
    """The normalised form of at most `limit` characters of `text`: cut before
    normalising, so NFKC never sees a huge text, and after, as NFKC can expand a
    character up to 18-fold (e.g. U+FDFA)."""
    return excerpt(normalise(excerpt(text, limit)), limit)


_SINGLE_CHARACTER = {sre_parse.LITERAL, sre_parse.NOT_LITERAL, sre_parse.ANY, sre_parse.IN,
                     sre_parse.CATEGORY}
_REPEATS = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, sre_parse.POSSESSIVE_REPEAT}


def _ways_to_match(items: Any) -> int:
    """A bound on how many ways a parsed pattern can try to match at one position (the
    backtracking a failing search does there). Raises ValueError for the constructs
    with no bound: unbounded repetition and repeated groups."""
    ways = 1
    for op, arg in items:
        if op in _REPEATS:
            _low, high, body = arg
            if high == sre_parse.MAXREPEAT:
                raise ValueError("unbounded repetition (write {m,n})")
            if high > 1 and not (len(body) == 1 and body[0][0] in _SINGLE_CHARACTER):
                raise ValueError("a repeated group (only one character may repeat more than once)")
            ways *= (high + 1) * _ways_to_match(body)
        elif op == sre_parse.SUBPATTERN:
            ways *= _ways_to_match(arg[-1])
        elif op == sre_parse.ATOMIC_GROUP:
            ways *= _ways_to_match(arg)
        elif op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
            ways *= _ways_to_match(arg[1])
        elif op == sre_parse.BRANCH:
            ways *= max(_ways_to_match(alternative) for alternative in arg[1])
        elif op == sre_parse.GROUPREF_EXISTS:
            ways *= max(_ways_to_match(branch) for branch in arg[1:] if branch)
    return ways


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a rule pattern, refusing one whose search could backtrack more than a
    bounded amount per position (then a search is linear in the text)."""
    try:
        ways = _ways_to_match(sre_parse.parse(pattern))
    except ValueError as exc:
        raise ValueError(f"pattern {pattern!r}: {exc}") from None
    if ways > MAX_PATTERN_WAYS:
        raise ValueError(f"pattern {pattern!r}: up to {ways} ways to match at one position "
                         f"(at most {MAX_PATTERN_WAYS}: narrow its {{m,n}} repeats)")
    return re.compile(pattern)


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
                patterns=tuple(compile_pattern(p) for p in entry["patterns"]),
                unless=tuple(compile_pattern(p) for p in entry.get("unless", [])),
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
    clean = normalised_excerpt(text, KEYWORD_TEXT_LIMIT)
    best: RuleVerdict | None = None
    for rule in book.rules:
        matched = rule.match(clean)
        if matched is not None and (best is None or rule.urgency < best.urgency):
            best = RuleVerdict(rule.id, rule.intent, rule.trigger, rule.urgency, rule.reason,
                               rule.suggestion, matched, None)
    return best


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence of `a` and `b`, bit-parallel (Hyyrö,
    2004): one pass over `b` with big-integer operations on len(a) bits, so its cost
    depends on the lengths alone — no input is slower than any other of its size."""
    if len(a) < len(b):
        a, b = b, a
    positions: dict[str, int] = {}
    for i, char in enumerate(a):
        positions[char] = positions.get(char, 0) | (1 << i)
    full = (1 << len(a)) - 1
    row = full
    for char in b:
        matches = row & positions.get(char, 0)
        row = ((row + matches) | (row - matches)) & full
    return len(a) - row.bit_count()


def similarity(a: str, b: str) -> float:
    """2·LCS / (len a + len b): difflib's ratio, with the exact longest common
    subsequence in place of its matching-blocks heuristic (never lower)."""
    if not a and not b:
        return 1.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


def _similar(a: str, b: str, threshold: float) -> bool:
    if a == b:
        return True
    if 2 * min(len(a), len(b)) / (len(a) + len(b)) < threshold:  # LCS <= the shorter
        return False
    return similarity(a, b) >= threshold


def repeated(lines: Sequence[ChatLine], rule: RepeatRule) -> list[ChatLine] | None:
    """The near-identical lines among the last `window` of `lines`, if there are enough."""
    recent = [(line, normalised_excerpt(line.content, COMPARED_TEXT_LIMIT))
              for line in lines[-rule.window:]]
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
