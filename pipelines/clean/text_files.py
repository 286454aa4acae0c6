"""Lines of txt / JSONL files, plain or compressed (``.gz``, ``.zst``), streamed.

Compression is recognised by suffix: ``<name>.<format>`` is plain,
``<name>.<format>.gz`` gzip and ``<name>.<format>.zst`` zstd. Any other name
(``.jsonl.bz2``, a ``.csv`` declared as JSONL) is rejected
(``unsupported_extension``) instead of being read as zero rows, and a folder's
``<name>.<format>.<anything>`` files are listed so that such files are seen and
rejected rather than skipped.

Files are decompressed as they are read, never whole: a few compressed bytes can
expand by orders of magnitude, so gzip output is capped per read (GzipFile.read(n)) and
zstd input is fed in small pieces (its decompressobj has no output cap). A
corrupt or truncated compressed file raises ``Reject("corrupt_compressed_file")``
after the lines that came before the fault; truncation shows as a missing end of
stream (gzip also checks its CRC, zstd its checksum where the frame has one).

A plain file can be read as several units (:class:`ByteSpan`): a span owns the
lines that *start* inside its byte range, so consecutive spans read every line
exactly once, and it is told how many newlines come before it, so line numbers
(and the ``file:line`` locations built from them) are the whole file's.
"""
from __future__ import annotations

import gzip
import posixpath
import re
import zlib
from dataclasses import dataclass
from typing import Iterator

import zstandard

from pipelines.clean.rejects import Reject
from pipelines.common import storage

TEXT_FORMATS = ("txt", "jsonl")
COMPRESSIONS = {"": "plain", ".gz": "gzip", ".zst": "zstd"}  # suffix after .<format> -> codec
CHUNK_BYTES = 1 << 20
ZSTD_FEED_BYTES = 4096  # bounds one zstd call's output (<= ~32768x its input) without a max_length
CORRUPT = "corrupt_compressed_file"


@dataclass(frozen=True)
class ByteSpan:
    """The lines of a plain file that start in ``[start, end)``. Reading begins one byte early
    (``read_from``): a newline there means the first line starts exactly at ``start``,
    anything else is the tail of a line an earlier span owns, skipped. ``newlines`` counts
    the file's newlines before ``read_from`` (filled in by a counting pass)."""
    start: int
    end: int
    newlines: int = 0

    @property
    def read_from(self) -> int:
        return max(self.start - 1, 0)


def is_text_file(path: str, fmt: str) -> bool:
    """A folder's file that a ``fmt`` source reads: ``*.<fmt>`` or ``*.<fmt>.<one suffix>``
    (an unknown suffix is then rejected by name, so a compressed corpus is never skipped)."""
    return re.search(rf"\.{re.escape(fmt)}(\.[^./]+)?$", posixpath.basename(path)) is not None


def compression(path: str, fmt: str) -> str:
    """The codec of a ``fmt`` file by its suffix; raises Reject for a name it cannot read."""
    name = posixpath.basename(path)
    for suffix, codec in COMPRESSIONS.items():
        if name.endswith(f".{fmt}{suffix}"):
            return codec
    expected = ", ".join(f".{fmt}{s}" for s in COMPRESSIONS)
    raise Reject("unsupported_extension", f"{name}: a {fmt} file must end in one of {expected}")


def text_lines(path: str, fmt: str, max_line_bytes: int,
               span: ByteSpan | None = None) -> Iterator[tuple[int, bytes | None, int]]:
    """:func:`iter_lines` of a ``fmt`` file, decompressed by its suffix; raises Reject for a
    name it cannot read or (after the lines before it) a corrupt compressed stream."""
    return iter_lines(path, max_line_bytes, compression(path, fmt), span)


def iter_lines(path: str, max_line_bytes: int, codec: str = "plain",
               span: ByteSpan | None = None) -> Iterator[tuple[int, bytes | None, int]]:
    """(1-based line number, bytes or None if longer than max_line_bytes, length) of non-blank
    lines: all of the file's, or those of ``span`` (plain files only)."""
    buf, overflow = bytearray(), 0
    lineno, pos = (span.newlines, span.read_from) if span else (0, 0)
    skipping = bool(span and span.start > 0)  # the tail of the line before the span
    chunks = read_chunks(path, codec, pos)
    try:
        while (chunk := _next_chunk(chunks, lineno)) is not None:
            start = 0
            while True:
                nl = chunk.find(b"\n", start)
                piece = chunk[start:] if nl < 0 else chunk[start:nl]
                if skipping:
                    pass
                elif overflow or len(buf) + len(piece) > max_line_bytes:
                    overflow += len(buf) + len(piece)
                    buf.clear()
                else:
                    buf += piece
                if nl < 0:
                    break
                lineno += 1
                if not skipping:
                    yield from _line(lineno, buf, overflow)
                buf.clear()
                overflow, start, skipping = 0, nl + 1, False
                if span and pos + nl + 1 >= span.end:  # the next line starts in the next span
                    return
            pos += len(chunk)
        if (buf or overflow) and not skipping:
            yield from _line(lineno + 1, buf, overflow)
    finally:
        chunks.close()


def count_newlines(path: str, start: int, end: int) -> int:
    """Newlines in bytes ``[start, end)`` of a plain file (the counting pass of ByteSpan)."""
    fs, p = storage.filesystem(path)
    count = 0
    with fs.open_input_file(p) as f:
        f.seek(start)
        while start < end and (chunk := f.read(min(CHUNK_BYTES, end - start))):
            count += chunk.count(b"\n")
            start += len(chunk)
    return count


def _next_chunk(chunks: Iterator[bytes], lineno: int) -> bytes | None:
    """The next chunk, None at the end; a Reject says after which line the file broke."""
    try:
        return next(chunks, None)
    except Reject as rej:
        raise Reject(rej.reason, f"after line {lineno}: {rej.detail}") from rej


def _line(lineno: int, buf: bytearray, overflow: int):
    if overflow:
        yield lineno, None, overflow
    elif buf.strip():  # blank lines separate rows; they are not rows
        line = bytes(buf).removesuffix(b"\r")
        yield lineno, line, len(line)


def read_chunks(path: str, codec: str, offset: int = 0) -> Iterator[bytes]:
    """The file's (decompressed) bytes in pieces of at most ~CHUNK_BYTES, from byte ``offset``
    of a plain file; a decoding error becomes Reject(corrupt_compressed_file)."""
    fs, p = storage.filesystem(path)
    if offset:
        with fs.open_input_file(p) as raw:
            raw.seek(offset)
            while chunk := raw.read(CHUNK_BYTES):
                yield chunk
        return
    # compression=None: pyarrow would otherwise decompress .gz/.zst itself, by suffix
    with fs.open_input_stream(p, compression=None) as raw:
        if codec == "plain":
            while chunk := raw.read(CHUNK_BYTES):
                yield chunk
            return
        try:
            yield from (_gzip_chunks if codec == "gzip" else _zstd_chunks)(raw)
        except (gzip.BadGzipFile, EOFError, zlib.error, zstandard.ZstdError) as err:
            raise Reject(CORRUPT, f"{codec}: {type(err).__name__}: {err}") from err


def _gzip_chunks(raw) -> Iterator[bytes]:
    counted = _Counted(raw)
    with gzip.GzipFile(fileobj=counted, mode="rb") as f:  # checks CRC and length; multi-member
        while chunk := f.read(CHUNK_BYTES):
            yield chunk
    if not counted.bytes:  # GzipFile reads an empty file as empty text; it is not gzip data
        raise EOFError("empty file, no gzip header")


class _Counted:
    """A read-only stream that counts the bytes read through it."""

    def __init__(self, stream):
        self.stream, self.bytes = stream, 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.bytes += len(data)
        return data


def _zstd_chunks(raw) -> Iterator[bytes]:
    """Every frame of a zstd stream (files may hold several); raises ZstdError where the
    data ends inside a frame or holds no frame at all (stream_reader returns short data
    there without a word)."""
    dctx = zstandard.ZstdDecompressor()
    decoder, in_frame, frames = dctx.decompressobj(), False, 0
    while data := raw.read(CHUNK_BYTES):
        for start in range(0, len(data), ZSTD_FEED_BYTES):
            piece = data[start:start + ZSTD_FEED_BYTES]
            while piece:
                in_frame = True
                if out := decoder.decompress(piece):
                    yield out
                if not decoder.eof:
                    break
                piece, decoder, in_frame, frames = decoder.unused_data, dctx.decompressobj(), False, frames + 1
    if in_frame or not frames:
        raise zstandard.ZstdError("data ends inside a frame (truncated)" if in_frame else "no zstd frame")


__all__ = ["TEXT_FORMATS", "COMPRESSIONS", "ByteSpan", "is_text_file", "compression", "text_lines", "iter_lines",
           "count_newlines", "read_chunks"]
