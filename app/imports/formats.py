"""Reading chat exports as a stream of records, each with its 1-based line number (the
text comes from `app.imports.decoding`).

Formats: a JSON array, NDJSON (one object per line) or CSV with a header; text in
UTF-8, UTF-8 with a BOM or GBK; optionally gzip-compressed. Nothing here holds
more than one block of the file in memory, so memory stays flat as files grow —
whatever the file holds: a line, a record or an element past its bound is one bad
record (never read whole), a row nested deeper than `MAX_JSON_DEPTH` or holding a
string that is not valid Unicode is one bad row, and reading stops with
`DecompressedTooLarge` once the decompressed bytes pass the job's limit (a gzip bomb;
`app.imports.decoding`).

Lines are counted on `\\n` only. A bare `\\r` is not a line break: real exports
carry stray carriage returns inside unquoted CSV fields, and Python's `csv`
module would split the record there.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import IO, Any

from app.imports.decoding import BLOCK, OpenBinary, UnreadableUpload, open_text
from app.imports.rows import KNOWN_FIELDS
from app.validation import MAX_JSON_DEPTH, check_tree, unicode_problem

MAX_ELEMENT_CHARS = 1 << 20  # a JSON element bigger than this is malformed, not unfinished
MAX_LINE_CHARS = 1 << 20  # an NDJSON or CSV line longer than this is a bad record
MAX_RECORD_CHARS = 1 << 20  # a CSV record (quoted fields may span lines) longer: bad record
MAX_CSV_COLUMNS = 1000
CR_STAND_IN = "\U0010fffd"  # a private-use code point that stands for a bare \r in CSV
_BARE_CR = re.compile(r"\r(?!\n)")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # surrogateescape's stand-ins for bad bytes
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class ImportFormat(StrEnum):
    JSON = "json"
    NDJSON = "ndjson"
    CSV = "csv"


@dataclass(slots=True)
class Record:
    """One record of the export: its fields, or why it could not be read.

    `source` is the record's own one-line JSON text when it decodes to exactly
    `fields` (an NDJSON line whose keys are already normal): the split stages that
    text as it is instead of encoding the fields again."""

    line: int
    fields: dict[str, Any] | None
    error: str | None = None
    source: str | None = None



def bounded_lines(text: IO[str], limit: int = MAX_LINE_CHARS) -> Iterator[str | None]:
    """The lines of `text` (each ending in `\\n`, but perhaps the last); None stands for
    a line longer than `limit` characters, which is skipped without being held whole."""
    readline = text.readline
    while True:
        line = readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith("\n"):
            while True:  # the rest of the over-long line, a block at a time
                rest = readline(BLOCK)
                if not rest or rest.endswith("\n"):
                    break
            yield None
            continue
        yield line


def detect_format(filename: str | None, open_binary: OpenBinary, encoding: str,
                  max_bytes: int | None = None) -> ImportFormat:
    """From the file name when it says (`.csv`, `.json`, `.ndjson`/`.jsonl`, with or
    without `.gz`), else from the first non-blank character: `[` JSON, `{` NDJSON,
    anything else CSV."""
    name = (filename or "").lower().removesuffix(".gz").removesuffix(".gzip")
    for suffix, fmt in ((".csv", ImportFormat.CSV), (".ndjson", ImportFormat.NDJSON),
                        (".jsonl", ImportFormat.NDJSON), (".json", ImportFormat.JSON)):
        if name.endswith(suffix):
            return fmt
    with open_text(open_binary, encoding, max_bytes) as text:
        head = text.read(4096).lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        return ImportFormat.JSON
    if head.startswith("{"):
        return ImportFormat.NDJSON
    return ImportFormat.CSV


def iter_records(text: IO[str], fmt: ImportFormat, *, clean: bool = False,
                 first_line: int = 1) -> Iterator[Record]:
    """The records of an upload; `clean` (from `scan_upload`) says every byte decoded,
    so only a JSON `\\u` escape can still spell a lone surrogate. `first_line` numbers
    the lines of one part of an NDJSON upload (`open_text_range`)."""
    if fmt is ImportFormat.CSV:
        return iter_csv(text, clean=clean)
    if fmt is ImportFormat.NDJSON:
        return iter_ndjson(text, clean=clean, first_line=first_line)
    return iter_json_array(text, clean=clean)


def normalize_key(key: str) -> str:
    return key.strip().lstrip("\ufeff").strip().lower().replace(" ", "_").replace("-", "_")


# An export repeats the same dozen keys on every row: normalise each spelling once.
_normalized_keys: dict[str, str] = {}


def _normal_key(key: str) -> str:
    normal = _normalized_keys.get(key)
    if normal is None:
        normal = normalize_key(key)
        if len(_normalized_keys) < 4096:
            _normalized_keys[key] = normal
    return normal


def has_undecodable(fields: dict[str, Any]) -> bool:
    """A top-level string of the row holds a lone surrogate (an undecodable byte, or a
    JSON escape such as ``"\ud800"``)."""
    return any(isinstance(v, str) and _LONE_SURROGATE.search(v) for v in fields.values())


def may_hold_undecodable(raw: str) -> bool:
    """False when the record's source text can hold no lone surrogate: neither an
    undecodable byte (decoded as a surrogate) nor a JSON `\\u` escape (that could
    spell one). Lets the per-field check be skipped for the usual clean row."""
    return "\\u" in raw or _UNDECODABLE.search(raw) is not None


def _surrogate_problem(fields: dict[str, Any], raw: str | None, encoding_note: str
                       ) -> str | None:
    for key, value in fields.items():
        if isinstance(value, str) and _LONE_SURROGATE.search(value):
            if raw is None or _UNDECODABLE.search(raw):
                return f"the row holds bytes that are not valid {encoding_note}"
            return f"{key}: {unicode_problem(value)}"
    return None


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` levels inside `value` (iterative)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _nested_problem(fields: dict[str, Any]) -> str | None:
    """A row nests at most MAX_JSON_DEPTH levels (the row itself is the first); a field
    the import reads holds only valid Unicode and numbers storage can keep."""
    for key, value in fields.items():
        if not isinstance(value, dict | list):
            continue
        if _deeper_than(value, MAX_JSON_DEPTH - 1):
            return f"{key[:64]}: {TOO_DEEP}"
        if key in KNOWN_FIELDS:
            try:
                check_tree(value)
            except ValueError as exc:
                return f"{key}: {str(exc)[:300]}"
    return None


def _checked(record: Record, encoding_note: str, raw: str | None = None, *,
             clean: bool = False, flat: bool = False) -> Record:
    """The record, or a bad record naming why: a string that is not valid Unicode (an
    undecodable byte, a lone surrogate escape), a row nested too deep. `flat` says no
    field can hold a container (CSV), `raw` is the record's source text if any."""
    fields = record.fields
    if fields is None:
        return record
    if clean:  # every byte decoded: only a JSON escape can spell a lone surrogate
        suspect = raw is not None and "\\u" in raw
    else:
        suspect = raw is None or may_hold_undecodable(raw)
    if suspect:
        problem = _surrogate_problem(fields, raw, encoding_note)
        if problem:
            return Record(record.line, None, problem)
    if not flat and (raw is None or "[" in raw or raw.find("{", 1) >= 0):
        problem = _nested_problem(fields)
        if problem:
            return Record(record.line, None, problem)
    return record


def count_records(text: IO[str], fmt: ImportFormat) -> int:
    """How many records `iter_records` yields (rows and unreadable records alike).

    NDJSON holds one record per non-blank line, so its lines are counted without
    decoding them; the other formats are parsed."""
    if fmt is ImportFormat.NDJSON:
        return sum(1 for line in bounded_lines(text)
                   if line is None or line.strip().lstrip("\ufeff"))
    return sum(1 for _ in iter_records(text, fmt))


class _TooLong(Exception):
    """Raised inside the CSV reader's line source: a line or a record past its bound."""


def iter_csv(text: IO[str], *, clean: bool = False) -> Iterator[Record]:
    """CSV with a header row; quoted fields may span lines (the record's line is where
    it starts); a bare \\r inside a field is kept as part of the field. A line longer
    than MAX_LINE_CHARS, a record longer than MAX_RECORD_CHARS or a field longer than
    the csv module's limit is a bad record; reading goes on after it."""
    encoding = getattr(text, "encoding", "utf-8")
    consumed = 0  # lines taken from `text` so far
    record_chars = 0  # characters of the record being read

    def lines() -> Iterator[str]:
        nonlocal consumed, record_chars
        for line in bounded_lines(text):
            consumed += 1
            if line is None:
                raise _TooLong(f"line {consumed} is longer than {MAX_LINE_CHARS} characters")
            record_chars += len(line)
            if record_chars > MAX_RECORD_CHARS:
                raise _TooLong(f"the record is longer than {MAX_RECORD_CHARS} characters")
            yield _BARE_CR.sub(CR_STAND_IN, line) if "\r" in line else line

    header: list[str] | None = None
    reader = csv.reader(lines(), strict=False)
    while True:
        start = consumed + 1
        record_chars = 0
        try:
            values = next(reader)
        except StopIteration:
            return
        except _TooLong as exc:
            if header is None:
                raise UnreadableUpload(f"line {start}: the CSV header is unreadable: {exc}"
                                       ) from None
            yield Record(start, None, f"unreadable CSV record: {exc}")
            reader = csv.reader(lines(), strict=False)  # the old one stopped mid-record
            continue
        except csv.Error as exc:
            yield Record(start, None, f"unreadable CSV record: {exc}")
            continue
        if not values or (len(values) == 1 and not values[0].strip()):
            continue  # blank line
        if any(CR_STAND_IN in v for v in values):
            values = [v.replace(CR_STAND_IN, "\r") for v in values]
        if header is None:
            if len(values) > MAX_CSV_COLUMNS:
                raise UnreadableUpload(f"line {start}: the CSV header has {len(values)} "
                                       f"columns; at most {MAX_CSV_COLUMNS}")
            header = [normalize_key(h) for h in values]
            if not any(header):
                raise UnreadableUpload("line 1: the CSV header is empty")
            continue
        if len(values) != len(header):
            yield Record(start, None,
                         f"the record has {len(values)} fields, the header has {len(header)}")
            continue
        fields = {k: v for k, v in zip(header, values, strict=True) if k}
        yield _checked(Record(start, fields), encoding, clean=clean, flat=True)
    # unreachable


def iter_ndjson(text: IO[str], *, clean: bool = False, first_line: int = 1
                ) -> Iterator[Record]:
    encoding = getattr(text, "encoding", "utf-8")
    for number, line in enumerate(bounded_lines(text), start=first_line):
        if line is None:
            yield Record(number, None, f"the line is longer than {MAX_LINE_CHARS} characters")
            continue
        body = line.strip().lstrip("\ufeff")
        if not body:
            continue
        value, error = _decode_line(body)
        if error is not None:
            yield Record(number, None, error)
            continue
        yield _checked(_as_object(number, value, body), encoding, body, clean=clean)


_DECODER = json.JSONDecoder()
TOO_DEEP = f"nested deeper than {MAX_JSON_DEPTH} levels"


def _decode_line(body: str) -> tuple[Any, str | None]:
    """`json.loads(body)` for a stripped line: one whole decode is what it does there,
    without its two whitespace regexes; anything else is left to it (and its error).
    A nesting the parser cannot follow (RecursionError) is an error of this line."""
    try:
        value, end = _DECODER.raw_decode(body)
        if end == len(body):
            return value, None
    except ValueError:
        pass
    except RecursionError:
        return None, TOO_DEEP
    try:
        return json.loads(body), None
    except ValueError as exc:
        return None, f"not valid JSON: {_json_error(exc)}"
    except RecursionError:
        return None, TOO_DEEP


# Tokens of JSON text, for finding where an element too deep to decode ends: runs of
# openers, runs of closers, strings (or an unterminated one: a lone quote), the rest.
_JSON_TOKENS = re.compile(r'[\[{]+|[\]}]+|"[^"\\]*(?:\\.[^"\\]*)*"|"|[^\[\]{}"]+', re.S)


def _element_end(buf: str, pos: int) -> int | None:
    """Where the container starting at `buf[pos]` ends (just after its last closer), or
    None if it does not end inside `buf`; iterative, so any depth is fine."""
    depth = 0
    for match in _JSON_TOKENS.finditer(buf, pos):
        token = match.group()
        first = token[0]
        if first in "[{":
            depth += len(token)
        elif first in "]}":
            if len(token) >= depth:
                return match.start() + depth
            depth -= len(token)
        elif token == '"':
            return None  # a string that does not end in the buffer
        if depth == 0:
            return match.end()
    return None


def iter_json_array(text: IO[str], *, clean: bool = False) -> Iterator[Record]:
    """The elements of a top-level JSON array, decoded one at a time from a moving
    window; a malformed element is reported and skipped up to the next element, and so
    is an element nested too deep for the parser (found by `_element_end`)."""
    encoding = getattr(text, "encoding", "utf-8")
    decoder = json.JSONDecoder()
    buf = ""
    pos = 0
    line = 1
    eof = False

    def fill() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        block = text.read(BLOCK)
        if not block:
            eof = True
            return False
        if pos > BLOCK:
            buf = buf[pos:]
            pos = 0
        buf += block
        return True

    def skip_space() -> None:
        nonlocal pos, line
        while True:
            end = len(buf)
            start = pos
            while pos < end and buf[pos] in " \t\r\n\ufeff":
                pos += 1
            line += buf.count("\n", start, pos)
            if pos < end or not fill():
                return

    skip_space()
    if pos >= len(buf):
        return
    if buf[pos] != "[":
        raise UnreadableUpload(f"line {line}: a JSON upload must be an array of message objects")
    pos += 1
    expect_value = True
    while True:
        skip_space()
        if pos >= len(buf):
            raise UnreadableUpload(f"line {line}: the JSON array is not closed (file truncated?)")
        char = buf[pos]
        if char == "]":
            return
        if not expect_value:
            if char != ",":
                raise UnreadableUpload(f"line {line}: expected ',' or ']' between elements")
            pos += 1
            expect_value = True
            continue
        try:
            value, end = decoder.raw_decode(buf, pos)
        except RecursionError:
            deep_end = _element_end(buf, pos)
            if deep_end is None:
                if not eof and len(buf) - pos < MAX_ELEMENT_CHARS and fill():
                    continue
                raise UnreadableUpload(
                    f"line {line}: an element is {TOO_DEEP} and does not end within "
                    f"{MAX_ELEMENT_CHARS} characters") from None
            yield Record(line, None, TOO_DEEP)
            line += buf.count("\n", pos, deep_end)
            pos = deep_end
            expect_value = False
            continue
        except ValueError as exc:
            if not eof and len(buf) - pos < MAX_ELEMENT_CHARS and fill():
                continue  # probably unfinished: read more and decode again
            yield Record(line, None, f"not valid JSON: {_json_error(exc)}")
            if not _resync(buf, pos):
                raise UnreadableUpload(
                    f"line {line}: malformed JSON, and no further element could be found"
                ) from None
            new_pos = _resync(buf, pos)
            line += buf.count("\n", pos, new_pos)
            pos = new_pos
            expect_value = True
            continue
        yield _checked(_as_object(line, value), encoding, buf[pos:end], clean=clean)
        line += buf.count("\n", pos, end)
        pos = end
        expect_value = False


def _resync(buf: str, pos: int) -> int:
    """Where the next element seems to start after a malformed one: a `{` that opens a
    line (pretty-printed or one-per-line arrays)."""
    match = re.compile(r"\n\s*,?\s*\{").search(buf, pos + 1)
    if match is None:
        return 0
    return match.end() - 1


def _as_object(line: int, value: Any, source: str | None = None) -> Record:
    """The object's fields under normal keys; `source` is kept when they already were."""
    if not isinstance(value, dict):
        return Record(line, None, f"expected a JSON object, got {type(value).__name__}")
    if _keys_are_normal(tuple(value)):
        return Record(line, value, source=source)
    return Record(line, {_normal_key(str(k)): v for k, v in value.items()})


# Rows repeat the same keys in the same order: judge each key sequence once.
_normal_key_sets: dict[tuple[str, ...], bool] = {}


def _keys_are_normal(keys: tuple[str, ...]) -> bool:
    verdict = _normal_key_sets.get(keys)
    if verdict is None:
        verdict = all(_normal_key(k) == k for k in keys)
        if len(_normal_key_sets) < 4096:
            _normal_key_sets[keys] = verdict
    return verdict


def _json_error(exc: Exception) -> str:
    return str(exc).split(": line", 1)[0]
