"""Map units of the clean stage: how a source is cut into pieces that Ray tasks read.

A unit is some files (a chunk of a folder's image files, or one file), or part
of one large file, so that one big file spreads over every core:

- a plain (uncompressed) txt/JSONL file larger than ``clean.unit_bytes`` becomes
  line-aligned byte ranges (:class:`~pipelines.clean.text_files.ByteSpan`: a
  range owns the lines that start inside it). A counting pass (one Ray task per
  range, reading at disk speed) tells each range how many newlines precede it,
  so its rows keep the whole file's line numbers in their locations;
- a Parquet file larger than ``unit_bytes`` becomes runs of consecutive row
  groups (:class:`RowGroupSpan`), a run closing once its compressed bytes reach
  ``unit_bytes``; row numbers in locations stay the file's;
- compressed text files (a stream has no random access) and tars (members are
  grouped by adjacency, a tar's index would cost a full scan) stay one unit each.

A split file's units are consecutive, so its rows keep file order in the order
key (source, unit, row) of pipelines.clean.rows. The number of dedup shards is
fixed here too, before the map runs (the map writes dedup keys already
partitioned by shard), after the counting pass: ``ceil(rows / clean.dedup_shard_rows)``
with the rows of plain txt/JSONL units counted exactly (the pass counts every plain text
unit's newlines, not only the spans that need them: it reads at disk speed, and an
estimate from bytes would put twice the rows in each shard of a corpus of short lines),
and the rest (compressed text, Parquet, tars) estimated from the planned bytes
(:data:`BYTES_PER_ROW`); image files count one row each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.clean.rejects import Reject
from pipelines.clean.sources import SUFFIXES, ReadLimits, SourceConfig, _confine
from pipelines.clean.text_files import TEXT_FORMATS, ByteSpan, compression, is_text_file
from pipelines.common import storage

# Input bytes per row assumed when fixing the dedup shard count before any row is read:
# small on purpose (short documents, small images), since too many shards only costs a few
# small tasks while too few costs a shard task's memory. A compressed text file counts 4x.
BYTES_PER_ROW = {"text": 256, "image": 8192, "pair": 8192}
COMPRESSED_TEXT_RATIO = 4
MAX_DEDUP_SHARDS = 4096


@dataclass(frozen=True)
class RowGroupSpan:
    """Row groups ``[first, end)`` of one Parquet file, after ``rows_before`` rows of it."""
    first: int
    end: int
    rows_before: int


@dataclass(frozen=True)
class Unit:
    """What one map step reads: ``files`` in order, or the ``span`` of its single file.
    ``size`` is the planned input bytes (0 for image files, counted as one row each);
    ``lines``: a plain txt/JSONL file (or span of one) whose rows the counting pass counts."""
    files: tuple[str, ...]
    span: ByteSpan | RowGroupSpan | None = None
    size: int = 0
    lines: bool = False


def plan_units(source: SourceConfig, files_per_unit: int, unit_bytes: int | None = None) -> list[Unit]:
    """Split a source into units (files larger than ``unit_bytes`` into parts; None: never);
    raises FileNotFoundError if its path is absent. Byte spans still need their newline
    counts (:func:`newline_jobs`, :func:`with_newlines`)."""
    if not storage.exists(source.path):
        raise FileNotFoundError(f"sources.{source.name}.path: {source.path!r} does not exist")
    files = _source_files(source)
    if source.format == "folder":
        return [Unit(tuple(files[i:i + files_per_unit])) for i in range(0, len(files), files_per_unit)]
    return [u for f in files for u in _file_units(source, f, unit_bytes)]


def _source_files(source: SourceConfig) -> list[str]:
    """A declared file whatever its name (its reader rejects what it cannot interpret, so it is
    never skipped unseen); a folder's files of the format, sorted."""
    if storage.file_info(source.path)[0] == pafs.FileType.File:
        return [str(source.path)]
    if source.format in TEXT_FORMATS:
        return [f for f in storage.list_files(source.path) if is_text_file(f, source.format)]
    return storage.list_files(source.path, SUFFIXES[source.format])


def _file_units(source: SourceConfig, path: str, unit_bytes: int | None) -> list[Unit]:
    kind, size = storage.file_info(path)
    size = size or 0
    plain = kind == pafs.FileType.File and _plain_text(source, path)
    whole = [Unit((path,), size=size * _expansion(source, path), lines=plain)]
    if unit_bytes is None or size <= unit_bytes or kind != pafs.FileType.File:
        return whole
    if plain:
        n = math.ceil(size / unit_bytes)
        return [Unit((path,), ByteSpan(k * size // n, (k + 1) * size // n), (k + 1) * size // n - k * size // n,
                     lines=True) for k in range(n)]
    try:
        _confine(source, path, ReadLimits(0, 0))  # nothing outside the source is opened, even to plan
        if source.format == "parquet":
            return _row_group_units(path, unit_bytes) or whole
    except (Reject, OSError, ValueError):  # its reader rejects it, as one unit
        return whole
    return whole


def _plain_text(source: SourceConfig, path: str) -> bool:
    """A plain txt/JSONL file inside its source (nothing outside it is opened, even to plan):
    split into byte spans when large, and the counting pass counts its rows."""
    try:
        _confine(source, path, ReadLimits(0, 0))
        return source.format in TEXT_FORMATS and compression(path, source.format) == "plain"
    except (Reject, OSError, ValueError):
        return False


def _expansion(source: SourceConfig, path: str) -> int:
    """How many input bytes one stored byte stands for, in the row estimate."""
    try:
        plain = source.format not in TEXT_FORMATS or compression(path, source.format) == "plain"
    except Reject:
        plain = True
    return 1 if plain else COMPRESSED_TEXT_RATIO


def _row_group_units(path: str, unit_bytes: int) -> list[Unit]:
    """Runs of consecutive row groups, each closed once its compressed bytes reach unit_bytes."""
    fs, p = storage.filesystem(path)
    with fs.open_input_file(p) as f:
        meta = pq.ParquetFile(f).metadata
    units, first, rows_before, rows, size = [], 0, 0, 0, 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        size += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
        rows += rg.num_rows
        if size >= unit_bytes or g == meta.num_row_groups - 1:
            units.append(Unit((path,), RowGroupSpan(first, g + 1, rows_before), size))
            first, rows_before, rows, size = g + 1, rows_before + rows, 0, 0
    return units if len(units) > 1 else []


def newline_jobs(units: list[Unit]) -> dict[int, tuple[str, int, int]]:
    """{unit index: (path, from, to)}: the bytes whose newlines the counting pass counts, for
    every ``lines`` unit: a byte span's from its read_from to the next span's (what a later
    span of the same file must know), or to its end; a whole file's, all of it."""
    jobs = {}
    for k, unit in enumerate(units):
        if not unit.lines:
            continue
        if not isinstance(unit.span, ByteSpan):
            jobs[k] = (unit.files[0], 0, unit.size)
            continue
        nxt = units[k + 1] if k + 1 < len(units) else None
        follows = nxt is not None and isinstance(nxt.span, ByteSpan) and nxt.files == unit.files \
            and nxt.span.start == unit.span.end
        jobs[k] = (unit.files[0], unit.span.read_from, nxt.span.read_from if follows else unit.span.end)
    return jobs


def with_newlines(units: list[Unit], counts: dict[int, int]) -> list[Unit]:
    """Units with each byte span's ``newlines`` set: the running sum of the counts of the
    spans before it in the same file (``counts`` as :func:`newline_jobs` keyed them)."""
    out, before = [], 0
    for k, unit in enumerate(units):
        if isinstance(unit.span, ByteSpan):
            before = before if unit.span.start else 0
            out.append(replace(unit, span=replace(unit.span, newlines=before)))
            before += counts.get(k, 0)
        else:
            out.append(unit)
    return out


def dedup_shards(units_by_source: list[tuple[str, list[Unit]]], shard_rows: int,
                 newlines: dict[int, int] | None = None) -> int:
    """Dedup shards for the planned input: ceil(rows / shard_rows), in [1, MAX]; ``newlines``
    (keyed by the flat unit index, as :func:`newline_jobs`) gives a counted unit's rows (at
    most its newlines + 1), the rest are estimated (see the module docstring)."""
    newlines, rows, k = newlines or {}, 0.0, 0
    for kind, units in units_by_source:
        for u in units:
            rows += newlines[k] + 1 if k in newlines else (u.size / BYTES_PER_ROW[kind] if u.size else len(u.files))
            k += 1
    return max(1, min(MAX_DEDUP_SHARDS, math.ceil(rows / shard_rows)))


__all__ = ["Unit", "RowGroupSpan", "ByteSpan", "plan_units", "newline_jobs", "with_newlines", "dedup_shards",
           "BYTES_PER_ROW"]
