"""Reading an upload's bytes as text: decompression, the one scan that finds the encoding,
the lines and the cut points, and decoding (the first half of reading a chat export;
the second, text into records, is `app.imports.formats`).

Texts are UTF-8, UTF-8 with a BOM or GBK; optionally gzip-compressed. Nothing here
holds more than one block of the file in memory, and reading stops with
`DecompressedTooLarge` once the decompressed bytes pass the job's limit (a gzip bomb).
A byte that does not decode becomes a surrogate in the text, so that the row holding it
is reported, not the whole file. Lines are counted on `\\n` only (see `formats`).
"""

from __future__ import annotations

import codecs
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

BLOCK = 1 << 16
GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = codecs.BOM_UTF8

OpenBinary = Callable[[], IO[bytes]]

ENCODINGS = ("utf-8", "utf-8-sig", "gbk")


class UnreadableUpload(ValueError):
    """The upload as a whole cannot be read (not a row-level problem)."""


class DecompressedTooLarge(UnreadableUpload):
    """The upload expands past MAX_UPLOAD_EXPANDED_BYTES once decompressed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the upload expands past MAX_UPLOAD_EXPANDED_BYTES ({limit} bytes) "
                         "once decompressed; nothing of it was imported")
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Scan:
    """What one pass over the upload's bytes tells: the encoding, whether every byte
    decodes in it (then no row can hold an undecodable byte), how many lines, how many
    decompressed bytes, and (when asked for) line-aligned cut points: `(offset, line)`,
    the byte offset just after a `\\n` and the number of the line that starts there."""

    encoding: str
    clean: bool
    lines: int
    size: int = 0
    cuts: tuple[tuple[int, int], ...] = ()


def is_gzip(head: bytes) -> bool:
    return head[:2] == GZIP_MAGIC


class _CountedStream(io.RawIOBase):
    """Bytes of `inner`, refused with `DecompressedTooLarge` past `limit` in total: a
    gzip bomb stops after `limit` bytes were inflated, whichever pass reads it."""

    def __init__(self, inner: IO[bytes], limit: int) -> None:
        self._inner = inner
        self._limit = limit
        self._read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(min(len(buffer), BLOCK))
        size = len(data)
        self._read += size
        if self._read > self._limit:
            raise DecompressedTooLarge(self._limit)
        buffer[:size] = data
        return size

    def close(self) -> None:
        self._inner.close()
        super().close()


def open_decompressed(open_binary: OpenBinary, max_bytes: int | None = None) -> IO[bytes]:
    """The upload's bytes, gunzipped on the fly when it starts with the gzip magic;
    with `max_bytes`, reading past that many (decompressed) bytes raises
    DecompressedTooLarge."""
    raw = open_binary()
    buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw, BLOCK)  # type: ignore[arg-type,type-var]
    stream: IO[bytes] = buffered  # type: ignore[assignment]
    if is_gzip(buffered.peek(2)[:2]):
        import gzip

        stream = gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[assignment]
    if max_bytes is None:
        return stream
    return io.BufferedReader(_CountedStream(stream, max_bytes), BLOCK)  # type: ignore[return-value]


def detect_encoding(open_binary: OpenBinary, max_bytes: int | None = None) -> str:
    """UTF-8 with a BOM, else UTF-8 if every byte decodes as UTF-8, else GBK.

    The whole stream is checked (incrementally), so a GBK character deep in a file
    that starts in ASCII is still found."""
    return scan_upload(open_binary, max_bytes=max_bytes).encoding


def scan_upload(open_binary: OpenBinary, encoding: str | None = None, *,
                max_bytes: int | None = None, cut_every: int | None = None) -> Scan:
    """One pass over the decompressed bytes: the encoding as `detect_encoding` finds it
    (unless given), whether every byte decodes in it, the number of lines (`\\n`, plus a
    last line without one) and, with `cut_every`, a cut at the first line start at or
    past every `cut_every` bytes. Past `max_bytes` decompressed: DecompressedTooLarge."""
    stream = open_decompressed(open_binary, max_bytes)
    try:
        head = stream.read(len(UTF8_BOM))
        if encoding is None:
            encoding = "utf-8-sig" if head == UTF8_BOM else "utf-8"
            fallback = None if head == UTF8_BOM else "gbk"
        else:
            fallback = None
        decoder: codecs.IncrementalDecoder | None = codecs.getincrementaldecoder(encoding)(
            "strict")
        lines = offset = 0
        last = b""
        block = head
        cuts: list[tuple[int, int]] = []
        next_cut = cut_every or 0
        while block:
            if decoder is not None:
                try:
                    decoder.decode(block)
                except UnicodeDecodeError:
                    # Not this encoding throughout: name the fallback, check no further.
                    decoder, encoding = None, fallback or encoding
            end = offset + len(block)
            while cut_every and next_cut < end:  # the first line start at or past it
                newline = block.find(b"\n", max(0, next_cut - offset - 1))
                if newline < 0:
                    break
                cut = offset + newline + 1
                cuts.append((cut, lines + block.count(b"\n", 0, newline + 1) + 1))
                next_cut = cut + cut_every
            lines += block.count(b"\n")
            offset, last = end, block[-1:]
            block = stream.read(BLOCK)
        clean = decoder is not None
        if decoder is not None:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                clean, encoding = False, fallback or encoding
        return Scan(encoding=encoding, clean=clean, lines=lines + (last not in (b"", b"\n")),
                    size=offset, cuts=tuple(c for c in cuts if c[0] < offset))
    finally:
        stream.close()


class _RangeStream(io.RawIOBase):
    """Bytes [start, stop) of `inner` (read from its beginning: a gzip stream cannot
    seek, so the bytes before `start` are inflated and dropped, a block at a time)."""

    def __init__(self, inner: IO[bytes], start: int, stop: int) -> None:
        self._inner = inner
        self._skip = start
        self._left = stop - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._skip > 0:
            dropped = len(self._inner.read(min(self._skip, 1 << 20)))
            if not dropped:
                return 0
            self._skip -= dropped
        if self._left <= 0:
            return 0
        data = self._inner.read(min(len(buffer), self._left, BLOCK))
        self._left -= len(data)
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._inner.close()
        super().close()


def open_text_range(open_binary: OpenBinary, encoding: str, start: int, stop: int,
                    max_bytes: int | None = None) -> IO[str]:
    """`open_text` of the decompressed bytes [start, stop) alone: one part of an upload
    cut at line starts (`Scan.cuts`), so no character and no line spans two parts."""
    stream = _RangeStream(open_decompressed(open_binary, max_bytes), start, stop)
    return io.TextIOWrapper(io.BufferedReader(stream, BLOCK), encoding=encoding,
                            errors="surrogateescape", newline="\n")


def open_text(open_binary: OpenBinary, encoding: str, max_bytes: int | None = None
              ) -> IO[str]:
    """Decoded text, split into lines on `\\n` only; undecodable bytes become
    surrogates so that the row holding them is reported, not the whole file."""
    return io.TextIOWrapper(
        open_decompressed(open_binary, max_bytes), encoding=encoding,
        errors="surrogateescape", newline="\n",
    )
