"""Splitting an upload into chunks so that every row of a slot lands in the same chunk.

The chunk of a row is a stable hash of its slot modulo the number of chunks
(total rows / BATCH_SIZE): no map of slots is kept, so memory does not grow with
the file. Rows wait in per-chunk buffers that are written out as compressed
pieces whenever the buffers together hold `spool_rows` rows.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from app.imports.rows import id_text

# The row fields the import reads (SPEC §4 names and aliases); others are dropped early.
KNOWN_FIELDS = frozenset({
    "message_id", "account_id", "user_id", "shop_id", "sender_role", "is_robot", "direction",
    "sender_id", "content", "message_type", "sent_at", "timestamp", "session_id", "task_type",
})

StagedRow = tuple[int, dict[str, Any]]


def chunk_count(total_rows: int, batch_size: int) -> int:
    return max(1, math.ceil(total_rows / batch_size))


def slot_of(fields: dict[str, Any]) -> tuple[str, str] | None:
    """(account_id, shop_id) as the row validator will normalise them, or None."""
    account = fields.get("account_id")
    if account is None or account == "":
        account = fields.get("user_id")
    shop = fields.get("shop_id")
    try:
        account_text, shop_text = id_text(account), id_text(shop)
    except ValueError:
        return None
    if not isinstance(account_text, str) or not isinstance(shop_text, str):
        return None
    if not account_text or not shop_text:
        return None
    return account_text, shop_text


def bucket_of(slot: tuple[str, str], buckets: int) -> int:
    return zlib.crc32(f"{slot[0]}\x1f{slot[1]}".encode("utf-8", "surrogatepass")) % buckets


class ChunkSpool:
    """Per-chunk row buffers, written out through `write(bucket, rows)` when full."""

    def __init__(self, buckets: int, write: Callable[[int, list[StagedRow]], None],
                 *, spool_rows: int = 50_000) -> None:
        self.buckets = buckets
        self._write = write
        self._limit = spool_rows
        self._buffers: dict[int, list[StagedRow]] = defaultdict(list)
        self._buffered = 0
        self.rows_per_bucket: dict[int, int] = defaultdict(int)

    def add(self, slot: tuple[str, str], line: int, fields: dict[str, Any]) -> None:
        bucket = bucket_of(slot, self.buckets)
        self._buffers[bucket].append((line, {k: v for k, v in fields.items()
                                             if k in KNOWN_FIELDS}))
        self.rows_per_bucket[bucket] += 1
        self._buffered += 1
        if self._buffered >= self._limit:
            self.flush()

    def flush(self) -> None:
        for bucket in sorted(self._buffers):
            rows = self._buffers[bucket]
            if rows:
                self._write(bucket, rows)
        self._buffers.clear()
        self._buffered = 0
