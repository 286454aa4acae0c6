"""Tiny source-corpus builders shared by the clean stage's tests: images, tars, line files,
img2dataset Parquet, zstd frames; and reading a whole source the way clean plans it."""
from __future__ import annotations

import io
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.clean.sources import ReadLimits, SourceConfig, read_unit
from pipelines.clean.units import plan_units

LIMITS = ReadLimits(max_file_bytes=1 << 20, max_line_bytes=1000)


# ---------------------------------------------------------------- tiny corpus builders (shared)

def png(color=(200, 30, 30), size=(48, 40), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path, members) -> None:
    """members: (name, bytes) regular files, or (name, TarInfo-type, linkname) special entries."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for member in members:
            info = tarfile.TarInfo(member[0])
            if len(member) == 3:
                info.type, info.linkname = member[1], member[2]
                tar.addfile(info)
            else:
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))


def write_lines(path, lines: list[bytes]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")


def read_all(source: SourceConfig, limits: ReadLimits = LIMITS):
    return [r for unit in plan_units(source, 2) for r in read_unit(source, unit, limits)]


def reasons(records) -> dict[str, str]:
    return {r.location: r.reject.reason for r in records if r.reject}


def img2dataset_parquet(path, ok: int = 3, failed: int = 2, image=png) -> None:
    """img2dataset's parquet output: bytes in `jpg`, plus `status` / `error_message` per row."""
    rows = [{"key": f"{i:09d}", "caption": f"caption {i}", "url": f"http://x/{i}.jpg", "jpg": image(i),
             "status": "success", "error_message": None} for i in range(ok)]
    rows += [{"key": f"{ok + i:09d}", "caption": f"caption {ok + i}", "url": f"http://x/{ok + i}.jpg", "jpg": None,
              "status": "failed_to_download", "error_message": f"HTTP Error 404 ({i})"} for i in range(failed)]
    order = [0, ok, 1, ok + 1, *range(2, ok), *range(ok + 2, ok + failed)]  # failures between successes
    pq.write_table(pa.Table.from_pylist([rows[i] for i in order]), path)


def zst(data: bytes, frames: int = 1) -> bytes:
    """zstd data as ``frames`` concatenated frames (as pzstd and appending writers make)."""
    import zstandard

    cut = [len(data) * k // frames for k in range(frames + 1)]
    return b"".join(zstandard.ZstdCompressor(write_checksum=True).compress(data[a:b]) for a, b in zip(cut, cut[1:]))
