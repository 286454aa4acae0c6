"""Safe, streaming reads of tar archives (WebDataset shards) and the path-escape rule.

Members are read from the archive stream in order and never extracted to
disk; names that are absolute or climb out with ``..`` and members that are
links or devices come back as rejections instead of data.
"""
from __future__ import annotations

import posixpath
import re
import tarfile
from typing import Iterator

from pipelines.clean.rejects import Reject
from pipelines.common import storage

DRAIN_BYTES = 1 << 20


def escapes(name: str) -> str | None:
    """Why a relative name (JSONL image path, tar member) would leave its folder, or None."""
    if not name:
        return "empty name"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", name) or "://" in name:
        return f"absolute name {name!r}"
    if ".." in re.split(r"[\\/]+", name):
        return f"name {name!r} climbs out with '..'"
    return None


class TailStream:
    """A read-only stream that remembers the last bytes read (to check a tar's end marker)."""

    def __init__(self, stream):
        self.stream, self.head, self.tail = stream, b"", b""

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.head = self.head or data[:2]
        self.tail = (self.tail + data)[-1024:]
        return data


def tar_members(path: str, max_file_bytes: int) -> Iterator[tuple[str, bytes | Reject]]:
    """(member name, bytes) of the regular files of a tar, or (name, Reject) for unsafe ones."""
    fs, p = storage.filesystem(path)
    seen = 0
    try:
        with fs.open_input_stream(p) as raw:
            stream = TailStream(raw)
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    seen += 1
                    yield from _tar_member(tar, member, max_file_bytes)
            # tarfile stops quietly when a cut falls between members; a whole tar ends with
            # zero blocks (checked for uncompressed tars only: gzip starts with 1f 8b).
            stream.read(DRAIN_BYTES)  # the rest of the last record (padding), as far as 1 MiB
            if stream.head != b"\x1f\x8b" and stream.tail.strip(b"\0"):
                yield "", Reject("truncated_archive", "ends without the tar end-of-archive blocks")
    except (tarfile.TarError, OSError, EOFError) as err:
        # Nothing readable at all: not a tar (or empty); otherwise it broke off part-way.
        reason = "truncated_archive" if seen else "unreadable_file"
        yield "", Reject(reason, f"{type(err).__name__}: {err}")


def _tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, max_file_bytes: int):
    if member.isdir():
        return
    if why := escapes(member.name):
        yield member.name, Reject("path_escape", f"tar member: {why}")
    elif not member.isfile():
        yield member.name, Reject("unsafe_member", "tar member is a link or device, not a file")
    elif member.size > max_file_bytes:
        yield member.name, Reject("file_too_large", f"{member.size} bytes > max_file_mb")
    else:
        yield member.name, tar.extractfile(member).read()


def wds_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = the path up to the first dot of the basename."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


__all__ = ["escapes", "tar_members", "wds_key", "TailStream"]
