"""Splitting an upload into chunks so that every row of a slot lands in the same chunk.

A chunk is what one worker task takes: its rows are validated, grouped and stored in
one transaction (a huge one-slot chunk in pages, `app.imports.pages`). The chunk of a
row is a stable hash of its slot modulo the number of chunks, `ceil(rows / TASK_ROWS)`:
no map of slots is kept, so memory does not grow with the file. Rows wait in per-chunk
buffers that are written out as compressed pieces when they are full (`ChunkSpool`;
a piece's layout: `staged_row`, `pack_staged`, `unpack_rows`).

Rows per task and BATCH_SIZE are two things (SPEC §10 as amended). BATCH_SIZE, the
seed's 批处理大小, bounds one database batch: a chunk writes its messages, sessions,
audit rows and transfers by executemany in batches of at most BATCH_SIZE rows
(`app.fastsql.core_insert`). How many rows one task takes is the project's choice,
`TASK_ROWS`, chosen by measurement (`tests/benchmarks/bench_import.py`, README
"Benchmarks"): a task costs a fixed part — the queue round trip, claiming the chunk,
reading its pieces, the probe and session look-ups, the commit with its done mark, the
count of chunks left — which at the default BATCH_SIZE of 100 rows a task was most of
the import's time (0.13× the plain insert). 5,000 rows make that part small and stay
well below the 10,000 valid rows (`pages.PageLimits.run_rows`) past which a chunk is
sorted and written in pages: a chunk's size varies with its slots (a hash spreads
whole slots), and a chunk of about 5,000 rows is one transaction of a few MiB in the
worker, so worker memory stays flat whatever the file's size. Only a slot bigger than
that (all of a huge history on one slot) makes a bigger chunk, and that one is paged.
Measured at 200,000 rows on 2 cores (2 worker processes), upload to job finished:
2,000 rows a task 10.3 s (100 tasks, 11.1 s of worker CPU), 5,000 rows 9.2 s (40 tasks,
10.1 s), 10,000 rows 14.7 s (20 tasks, 17.0 s: half the chunks past 10,000 rows went
through the paged path).
"""

from __future__ import annotations

import json
import math
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from app.imports.rows import KNOWN_FIELDS, id_text

StagedRow = str  # `<line>\t<JSON object>`, see `staged_row`


# Rows one worker task takes (about: whole slots are hashed into chunks).
TASK_ROWS = 5_000


def chunk_count(total_rows: int, task_rows: int = TASK_ROWS) -> int:
    """How many chunks an upload of `total_rows` rows is split into."""
    return max(1, math.ceil(total_rows / task_rows))


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
    """Per-chunk buffers of staged rows (`staged_row`), written out through
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


# ---- staged row pieces (compressed JSON) -----------------------------------------------
_ROW_DECODER = json.JSONDecoder()


def staged_row(line: int, fields: dict[str, Any], source: str | None = None) -> str:
    """One staged row, `<line>\\t<JSON object>`: the record's own text when given (no
    second encoding), else its fields encoded. JSON text never holds a raw newline."""
    if source is None:
        source = json.dumps(fields, ensure_ascii=False, separators=(",", ":"), default=str)
    return f"{line}\t{source}"


def pack_staged(rows: list[str]) -> bytes:
    """Staged rows, one per line, zlib-compressed (fast level: the pieces live briefly)."""
    return zlib.compress("\n".join(rows).encode("utf-8", "surrogatepass"), 1)


def pack_rows(rows: list[tuple[int, dict[str, Any]]]) -> bytes:
    return pack_staged([staged_row(line, fields) for line, fields in rows])


def unpack_rows(payload: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    """The rows of a piece; also reads the layouts of earlier versions (one JSON array
    `[[line, fields], …]`, or one `[line, fields]` per line), so a job split before an
    upgrade still runs."""
    text = zlib.decompress(payload).decode("utf-8", "surrogatepass")
    if text[:1].isdigit():
        decode = _ROW_DECODER.raw_decode
        for row in text.split("\n"):
            number, _, body = row.partition("\t")
            fields, end = decode(body)  # one object and nothing around it: staged by us
            if end != len(body):
                raise ValueError(f"the staged row of line {number} is malformed")
            yield int(number), fields
        return
    if not text:
        return
    if text.startswith("[[") or text == "[]":
        for number, fields in json.loads(text):
            yield number, fields
        return
    for line in text.split("\n"):
        if line:
            number, fields = json.loads(line)
            yield number, fields
