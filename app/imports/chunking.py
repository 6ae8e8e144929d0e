"""Splitting an upload into chunks so that every row of a slot lands in the same chunk.

The chunk of a row is a stable hash of its slot modulo the number of chunks
(total rows / BATCH_SIZE): no map of slots is kept, so memory does not grow with
the file. Rows wait in per-chunk buffers that are written out as compressed
pieces when they are full (`ChunkSpool`).
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from app.imports.formats import staged_row
from app.imports.rows import KNOWN_FIELDS, id_text

StagedRow = str  # `<line>\t<JSON object>`, see `formats.staged_row`


def chunk_count(total_rows: int, batch_size: int) -> int:
    return max(1, math.ceil(total_rows / batch_size))


def slot_of(fields: dict[str, Any]) -> tuple[str, str] | None:
    """(account_id, shop_id) as the row validator will normalise them, or None."""
    account = fields.get("account_id")
    shop = fields.get("shop_id")
    if type(account) is str and type(shop) is str:  # the usual row, without id_text's checks
        account_text, shop_text = account.strip(), shop.strip()
        if account_text and shop_text:
            return account_text, shop_text
    if account is None or account == "":
        account = fields.get("user_id")
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
    """Per-chunk buffers of staged rows (`formats.staged_row`), written out through
    `write(bucket, rows)`: all of them when they hold `spool_rows` rows or `spool_chars`
    characters together (memory stays bounded whatever the file), one bucket alone when
    it holds `piece_chars` (a piece stays well inside MySQL's max_allowed_packet)."""

    def __init__(self, buckets: int, write: Callable[[int, list[StagedRow]], None],
                 *, spool_rows: int = 50_000, spool_chars: int = 32 << 20,
                 piece_chars: int = 1 << 20) -> None:
        self.buckets = buckets
        self._write = write
        self._limit = spool_rows
        self._char_limit = spool_chars
        self._piece_chars = piece_chars
        self._buffers: dict[int, list[StagedRow]] = defaultdict(list)
        self._chars: dict[int, int] = defaultdict(int)
        self._buffered = 0
        self._buffered_chars = 0
        self.rows_per_bucket: dict[int, int] = defaultdict(int)

    def add(self, slot: tuple[str, str], line: int, fields: dict[str, Any],
            source: str | None = None) -> None:
        """Stage a row; `source` is its JSON text, staged as it is when it holds only
        fields the import reads (others are dropped early, to keep pieces small)."""
        bucket = bucket_of(slot, self.buckets)
        if source is None or not KNOWN_FIELDS.issuperset(fields):
            fields = {k: v for k, v in fields.items() if k in KNOWN_FIELDS}
            source = None
        row = staged_row(line, fields, source)
        self._buffers[bucket].append(row)
        self._chars[bucket] += len(row)
        self.rows_per_bucket[bucket] += 1
        self._buffered += 1
        self._buffered_chars += len(row)
        if self._buffered >= self._limit or self._buffered_chars >= self._char_limit:
            self.flush()
        elif self._chars[bucket] >= self._piece_chars:
            self._flush_bucket(bucket)

    def flush(self) -> None:
        for bucket in sorted(self._buffers):
            self._flush_bucket(bucket)
        self._buffers.clear()
        self._chars.clear()
        self._buffered = self._buffered_chars = 0

    def _flush_bucket(self, bucket: int) -> None:
        rows = self._buffers.pop(bucket, None)
        chars = self._chars.pop(bucket, 0)
        if rows:
            self._write(bucket, rows)
            self._buffered -= len(rows)
            self._buffered_chars -= chars
