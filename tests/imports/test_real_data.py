"""Real exports (shared/data beside the checkout, see SOURCE.md) mapped to the import format.

Twitter customer support: the brand's tweets are our staff (`human`), the customer's
are the counterpart; one fixed account, shop_id = the customer. The mapped CSV keeps
the source's quirks: rows out of order, quoted multi-line texts, and the bare `\\r`
inside an unquoted field (tweet 3399), which the import's CSV reader must handle.
Ubuntu IRC: the first speaker of a dialogue asks (counterpart), the others help
(`human`); shop_id = dialogueID.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.imports import decoding, formats
from app.imports.formats import ImportFormat
from app.messages.models import Message
from app.sessions.models import Session
from tests.imports.helpers import run_job
from tests.shared_data import TWCS_CSV, UBUNTU_CSV

TWITTER = TWCS_CSV
UBUNTU = UBUNTU_CSV
GAP = timedelta(minutes=30)
MENTION = re.compile(r"@(\d+)")

pytestmark = pytest.mark.skipif(not TWITTER.exists() or not UBUNTU.exists(),
                                reason="real data files not present")


def source_records(path: Path) -> list[formats.Record]:
    with decoding.open_text(lambda: path.open("rb"), "utf-8") as text:
        return list(formats.iter_records(text, ImportFormat.CSV))


def csv_field(value: str) -> str:
    """Quote like the source does: only for commas, quotes and newlines — a bare \\r
    stays unquoted, as in the original file."""
    if any(ch in value for ch in ',"\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


def write_csv(header: list[str], rows: list[list[str]]) -> bytes:
    lines = [",".join(header)] + [",".join(csv_field(v) for v in r) for r in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


def map_twitter(*, replies: bool = False) -> tuple[bytes, list[dict], int]:
    """The export as our CSV; with `replies`, a `reply_to` column from the source's
    `in_response_to_tweet_id` (written as a float there: `3.0`)."""
    records = source_records(TWITTER)
    authors = {r.fields["tweet_id"]: r.fields for r in records if r.fields}
    out, mapped = [], []
    for record in records:
        f = record.fields
        assert f is not None
        inbound = f["inbound"] == "True"
        if inbound:
            customer = f["author_id"]
        else:
            mention = MENTION.search(f["text"])
            parent = authors.get((f["in_response_to_tweet_id"] or "").removesuffix(".0"))
            customer = mention.group(1) if mention else (
                parent["author_id"] if parent and parent["inbound"] == "True" else "")
        sent = datetime.strptime(f["created_at"], "%a %b %d %H:%M:%S %z %Y").astimezone(UTC)
        parent_id = (f["in_response_to_tweet_id"] or "").removesuffix(".0")
        row = ["tw-" + f["tweet_id"], "twitter-care", customer,
               "counterpart" if inbound else "human", f["author_id"], f["text"],
               sent.isoformat()]
        if replies:
            row.append("tw-" + parent_id if parent_id else "")
        out.append(row)
        mapped.append({"message_id": row[0], "shop_id": customer, "sent_at": sent,
                       "text": f["text"], "parent": "tw-" + parent_id if parent_id else None})
    header = ["message_id", "account_id", "shop_id", "sender_role", "sender_id", "content",
              "sent_at"] + (["reply_to"] if replies else [])
    return write_csv(header, out), mapped, len(records)


def map_ubuntu() -> tuple[bytes, list[dict], int]:
    records = source_records(UBUNTU)
    by_dialogue: dict[str, list[formats.Record]] = defaultdict(list)
    for r in records:
        by_dialogue[r.fields["dialogueid"]].append(r)
    asker = {d: min(rs, key=lambda r: (r.fields["date"], r.line)).fields["from"]
             for d, rs in by_dialogue.items()}
    out, mapped = [], []
    for r in records:
        f = r.fields
        role = "counterpart" if f["from"] == asker[f["dialogueid"]] else "human"
        out.append([f"ub-{r.line}", "ubuntu-help", f["dialogueid"], role, f["from"], f["text"],
                    f["date"]])
        mapped.append({"message_id": f"ub-{r.line}", "shop_id": f["dialogueid"],
                       "sent_at": datetime.fromisoformat(f["date"].replace("Z", "+00:00")),
                       "text": f["text"]})
    header = ["message_id", "account_id", "shop_id", "sender_role", "sender_id", "content",
              "sent_at"]
    return write_csv(header, out), mapped, len(records)


def expected_segments(rows: list[dict]) -> int:
    by_slot: dict[str, list[datetime]] = defaultdict(list)
    for r in rows:
        by_slot[r["shop_id"]].append(r["sent_at"])
    count = 0
    for times in by_slot.values():
        times.sort()
        count += 1 + sum(1 for a, b in zip(times, times[1:], strict=False) if b - a > GAP)
    return count


def stored(runtime, account: str) -> tuple[int, int, set[str]]:
    with runtime.database.read() as db:
        messages = db.execute(select(func.count()).select_from(Message)
                              .where(Message.account_id == account)).scalar_one()
        sessions = db.execute(select(func.count()).select_from(Session)
                              .where(Session.account_id == account)).scalar_one()
        ids = set(db.execute(select(Message.message_id)).scalars())
    return messages, sessions, ids


def test_twitter_support_export_imports_every_row_and_splits_at_gaps(runtime):
    runtime.settings.batch_size = 500
    data, mapped, source_rows = map_twitter()
    assert source_rows == 5000
    assert b"\r" in data and data.count(b"\n") > 5001  # quirks kept: bare \r, multi-line
    job = run_job(runtime, data, filename="twitter.csv")
    valid = [r for r in mapped if r["shop_id"]]
    assert job.total_rows == 5000
    assert job.inserted + job.invalid == 5000 and job.duplicates == 0
    assert job.inserted == len(valid)  # no valid row lost
    assert job.invalid == len(mapped) - len(valid) == len(job.errors[:job.invalid])
    assert all("shop_id" in e.error for e in job.errors)
    messages, sessions, ids = stored(runtime, "twitter-care")
    assert messages == job.inserted and {r["message_id"] for r in valid} <= ids
    assert sessions == job.sessions_created == expected_segments(valid)
    with runtime.database.read() as db:  # the bare-\r tweet arrived whole
        text = db.execute(select(Message.content).where(Message.message_id == "tw-3399")
                          ).scalar_one()
    assert text.count("\r") == 2 and text == next(r["text"] for r in mapped
                                                   if r["message_id"] == "tw-3399")
    again = run_job(runtime, data, filename="twitter.csv")
    assert (again.inserted, again.duplicates, again.sessions_created,
            again.sessions_updated) == (0, job.inserted, 0, 0)
    assert stored(runtime, "twitter-care")[:2] == (messages, sessions)


def test_ubuntu_dialogues_import_every_row_and_split_long_pauses(runtime):
    runtime.settings.batch_size = 1000
    data, mapped, source_rows = map_ubuntu()
    assert source_rows == 9999
    job = run_job(runtime, io.BytesIO(data).getvalue(), filename="ubuntu.csv")
    assert (job.status, job.total_rows, job.inserted, job.invalid) == (
        "succeeded", 9999, 9999, 0)
    segments = expected_segments(mapped)
    assert segments > 3333  # dialogues with pauses over 30 minutes are split
    messages, sessions, _ = stored(runtime, "ubuntu-help")
    assert (messages, sessions, job.sessions_created) == (9999, segments, segments)
    with runtime.database.read() as db:
        kinds = dict(db.execute(select(Session.unanswered, func.count())
                                .where(Session.account_id == "ubuntu-help")
                                .group_by(Session.unanswered)).all())
    assert kinds[True] > 0  # the askers left alone (one-speaker dialogues, split tails)
    again = run_job(runtime, data, filename="ubuntu.csv")
    assert (again.inserted, again.duplicates, again.sessions_created) == (0, 9999, 0)


# ---- scoring the grouping against ground truth ------------------------------------------
# Pairwise same-conversation precision/recall/F1 within each (account, shop): every pair of
# one slot's messages is a true pair when the ground truth puts both in one conversation,
# a found pair when the import put both in one session.
def pairwise_scores(found: dict[str, object], truth: dict[str, object],
                    slot_of: dict[str, str]) -> tuple[float, float, float]:
    by_slot: dict[str, list[str]] = defaultdict(list)
    for message_id, slot in slot_of.items():
        by_slot[slot].append(message_id)
    both = found_pairs = true_pairs = 0
    for ids in by_slot.values():
        for i, a in enumerate(ids):
            for b in ids[i + 1:]:
                same_found = found[a] == found[b]
                same_truth = truth[a] == truth[b]
                found_pairs += same_found
                true_pairs += same_truth
                both += same_found and same_truth
    precision = both / found_pairs if found_pairs else 1.0
    recall = both / true_pairs if true_pairs else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def gap_rule(rows: list[dict]) -> dict[str, object]:
    """The gap rule's partition, computed here from the mapped rows."""
    by_slot: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_slot[r["shop_id"]].append(r)
    found: dict[str, object] = {}
    for slot, slot_rows in by_slot.items():
        segment, last = 0, None
        for r in sorted(slot_rows, key=lambda r: r["sent_at"]):
            if last is not None and r["sent_at"] - last > GAP:
                segment += 1
            found[r["message_id"]] = (slot, segment)
            last = r["sent_at"]
    return found


def twitter_threads(rows: list[dict]) -> dict[str, object]:
    """Ground truth: a conversation is a thread as the slot holds it — the tweets of one
    customer's slot that the source's reply links join, directly or through other tweets
    of that slot (a thread another customer joins is, in that customer's slot, the part
    of it there; a reply whose parent is missing or elsewhere starts one)."""
    slot_of = {r["message_id"]: r["shop_id"] for r in rows}
    parent = {r["message_id"]: r["parent"] for r in rows}

    def root(message_id: str) -> str:
        seen = set()
        while (up := parent.get(message_id)) and slot_of.get(up) == slot_of[message_id] \
                and message_id not in seen:
            seen.add(message_id)
            message_id = up
        return message_id

    return {r["message_id"]: root(r["message_id"]) for r in rows}


def twitter_whole_threads(rows: list[dict]) -> dict[str, object]:
    """The stricter truth: whole threads (SOURCE.md's 1,312), whatever slots they cross —
    no grouping of one slot can follow a chain through another slot's tweets."""
    parent = {r["message_id"]: r["parent"] for r in rows}

    def root(message_id: str) -> str:
        seen = set()
        while (up := parent.get(message_id)) and up in parent and message_id not in seen:
            seen.add(message_id)
            message_id = up
        return message_id

    return {r["message_id"]: root(r["message_id"]) for r in rows}


def stored_sessions(runtime, account: str) -> dict[str, object]:
    with runtime.database.read() as db:
        return {message_id: pk for message_id, pk in db.execute(
            select(Message.message_id, Message.session_pk)
            .where(Message.account_id == account))}


def same_partition(a: dict[str, object], b: dict[str, object]) -> bool:
    """Whether two groupings of the same messages put exactly the same ones together."""
    def blocks(grouping: dict[str, object]) -> set[frozenset[str]]:
        found: dict[object, set[str]] = defaultdict(set)
        for message_id, key in grouping.items():
            found[key].add(message_id)
        return {frozenset(ids) for ids in found.values()}

    return a.keys() == b.keys() and blocks(a) == blocks(b)


def test_twitter_reply_links_reconstruct_the_threads(runtime):
    runtime.settings.batch_size = 500
    data, mapped, _ = map_twitter(replies=True)
    job = run_job(runtime, data, filename="twitter.csv")
    valid = [r for r in mapped if r["shop_id"]]
    assert (job.inserted, job.invalid) == (len(valid), len(mapped) - len(valid))
    found = stored_sessions(runtime, "twitter-care")
    slot_of = {r["message_id"]: r["shop_id"] for r in valid}
    truth = twitter_threads(valid)
    precision, recall, f1 = pairwise_scores(found, truth, slot_of)
    gap_f1 = pairwise_scores(gap_rule(valid), truth, slot_of)[2]
    print(f"twitter with reply links: P {precision:.3f} R {recall:.3f} F1 {f1:.3f} "
          f"(gap rule F1 {gap_f1:.3f})")
    assert f1 >= 0.95 and f1 > gap_f1 + 0.3
    whole = twitter_whole_threads(valid)
    whole_f1 = pairwise_scores(found, whole, slot_of)[2]
    whole_gap_f1 = pairwise_scores(gap_rule(valid), whole, slot_of)[2]
    print(f"  against whole threads: F1 {whole_f1:.3f} (gap rule {whole_gap_f1:.3f})")
    assert whole_f1 > whole_gap_f1 + 0.3
    with runtime.database.read() as db:
        reasons = {by: n for by, n in db.execute(
            select(Session.started_by, func.count())
            .where(Session.account_id == "twitter-care").group_by(Session.started_by))}
    assert set(reasons) == {"reply", "gap"} and reasons["reply"] > reasons["gap"]
    again = run_job(runtime, data, filename="twitter.csv")
    assert (again.inserted, again.sessions_created, again.sessions_updated) == (0, 0, 0)
    assert stored_sessions(runtime, "twitter-care") == found


def test_twitter_without_reply_links_is_exactly_the_gap_rule(runtime):
    runtime.settings.batch_size = 500
    data, mapped, _ = map_twitter()
    run_job(runtime, data, filename="twitter.csv")
    valid = [r for r in mapped if r["shop_id"]]
    found = stored_sessions(runtime, "twitter-care")
    assert same_partition(found, gap_rule(valid))
    slot_of = {r["message_id"]: r["shop_id"] for r in valid}
    precision, recall, f1 = pairwise_scores(found, twitter_threads(valid), slot_of)
    print(f"twitter, gap rule: P {precision:.3f} R {recall:.3f} F1 {f1:.3f}")
    assert (round(precision, 3), round(recall, 3), round(f1, 3)) == (0.931, 0.470, 0.624)


def test_ubuntu_grouping_is_exactly_the_gap_rule(runtime):
    runtime.settings.batch_size = 1000
    data, mapped, _ = map_ubuntu()
    run_job(runtime, data, filename="ubuntu.csv")
    found = stored_sessions(runtime, "ubuntu-help")
    assert same_partition(found, gap_rule(mapped))
    slot_of = {r["message_id"]: r["shop_id"] for r in mapped}
    truth = {r["message_id"]: r["shop_id"] for r in mapped}  # dialogueID: one a slot
    precision, recall, f1 = pairwise_scores(found, truth, slot_of)
    print(f"ubuntu, gap rule: P {precision:.3f} R {recall:.3f} F1 {f1:.3f}")
    assert (round(precision, 3), round(f1, 3)) == (1.0, 0.987)
