"""Output parts of the clean stage: ``<out>/<name>/part-NNNNN.parquet``, bounded in rows and bytes.

A part closes before the row that would take it past ``part_rows`` rows or
``part_bytes`` bytes (a row's size: the lengths of its strings and binaries plus
8 bytes per fixed-width value; one row larger than ``part_bytes`` gets a part of
its own). Rows are encoded into the part as they arrive, in row groups of at
most ``ROW_GROUP_BYTES``, so the writer holds one encoded part (<= about
part_bytes: images do not compress further, text shrinks) plus one row group of
Arrow rows; the part is written atomically (storage.write_bytes) once full. All
cuts depend on the rows alone, never on how they were batched, so the same rows
give byte-identical parts, and a writer started at a part boundary (``first_part``:
the global number of its first part) writes exactly the parts a single writer
would (pipelines.clean.outputs runs the output pass this way, in parallel).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.common import storage

ROW_GROUP_BYTES = 8 * 2**20


def compression(schema: pa.Schema) -> dict[str, str]:
    """zstd, except binary columns (encoded images are compressed already: zstd would save
    next to nothing and cost CPU per image on write and again on every read)."""
    return {f.name: "none" if pa.types.is_binary(f.type) else "zstd" for f in schema}


def row_sizes(table: pa.Table) -> np.ndarray:
    """Deterministic size estimate of each row, (rows,) int64."""
    sizes = np.zeros(len(table), np.int64)
    for column in table.columns:
        if pa.types.is_string(column.type) or pa.types.is_binary(column.type):
            sizes += pc.fill_null(pc.binary_length(column), 0).to_numpy().astype(np.int64)
        else:
            sizes += 8
    return sizes


class PartWriter:
    """Write a stream of tables (all of ``schema``), in order, as byte- and row-bounded parts."""

    def __init__(self, out: str, name: str, schema: pa.Schema, part_rows: int, part_bytes: int, first_part: int = 0):
        self.out, self.name, self.schema, self.first_part = out, name, schema, first_part
        self.part_rows, self.part_bytes = part_rows, part_bytes
        self.rg_bytes = min(part_bytes, ROW_GROUP_BYTES)
        self.group: list[pa.Table] = []
        self.group_rows = self.group_size = 0
        self.part_n = self.part_size = 0
        self.sink = self.writer = None
        self.stats = {"parts": 0, "rows": 0, "bytes": 0, "by_source": Counter()}

    def add(self, table: pa.Table) -> None:
        sizes, start = row_sizes(table), 0
        while start < len(table):
            if self.part_n and (self.part_n >= self.part_rows or self.part_size + sizes[start] > self.part_bytes):
                self._finish_part()
            if self.group_rows and self.group_size + sizes[start] > self.rg_bytes:
                self._flush_group()
            rows_room = self.part_rows - self.part_n
            bytes_room = min(self.part_bytes - self.part_size, self.rg_bytes - self.group_size)
            fit = int(np.searchsorted(np.cumsum(sizes[start:start + rows_room]), bytes_room, side="right"))
            n = max(1, min(rows_room, fit))  # a row bigger than the limits goes alone
            piece = table.slice(start, n)
            self.group.append(piece)
            size = int(sizes[start:start + n].sum())
            self.group_rows += n
            self.group_size += size
            self.part_n += n
            self.part_size += size
            self.stats["by_source"].update(piece.column("source").to_pylist())
            start += n

    def close(self) -> dict:
        if self.part_n:
            self._finish_part()
        return self.stats

    def _flush_group(self) -> None:
        if self.writer is None:
            self.sink = pa.BufferOutputStream()
            self.writer = pq.ParquetWriter(self.sink, self.schema, compression=compression(self.schema),
                                           write_statistics=True)
        table = pa.concat_tables(self.group).combine_chunks()  # same bytes whatever the batch boundaries were
        self.writer.write_table(table, row_group_size=len(table))
        self.group, self.group_rows, self.group_size = [], 0, 0

    def _finish_part(self) -> None:
        self._flush_group()
        self.writer.close()
        data = self.sink.getvalue()
        storage.write_bytes(storage.join(self.out, self.name, f"part-{self.first_part + self.stats['parts']:05d}.parquet"), data)
        self.stats["parts"] += 1
        self.stats["rows"] += self.part_n
        self.stats["bytes"] += data.size
        self.sink = self.writer = None
        self.part_n = self.part_size = 0


__all__ = ["PartWriter", "row_sizes", "compression", "ROW_GROUP_BYTES"]
