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

from app.imports import formats
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
    with formats.open_text(lambda: path.open("rb"), "utf-8") as text:
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


def map_twitter() -> tuple[bytes, list[dict], int]:
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
        row = ["tw-" + f["tweet_id"], "twitter-care", customer,
               "counterpart" if inbound else "human", f["author_id"], f["text"],
               sent.isoformat()]
        out.append(row)
        mapped.append({"message_id": row[0], "shop_id": customer, "sent_at": sent,
                       "text": f["text"]})
    header = ["message_id", "account_id", "shop_id", "sender_role", "sender_id", "content",
              "sent_at"]
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
