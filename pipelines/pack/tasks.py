"""pack's Ray tasks: scatter a unit of parts by key range, gather one shard from every
scatter file (the layout and the reasons: pipelines.pack's docstring). Workers import this
module alone; nothing here runs on the driver."""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.common import storage
from pipelines.common.schema import MODALITIES, check_schema, shard_schema

KEY, RANGE = "__key", "__range"
# Key ranges per (estimated) shard: more ranges mean less over-read per gather, more
# row groups per scatter file.
RANGES_PER_SHARD = 8
SORT_BYTES = 8 * 2**20  # scatter: consecutive parts sorted together (fewer, larger slices per row group)


def scatter_path(scatter_dir: str, part: int) -> str:
    return storage.join(scatter_dir, f"part-{part:05d}.parquet")


def route(ids: list[str], seed: int, threshold: int, ranges: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(key, global key range) of each id: val ranges follow train's; range = top key bits."""
    digests = b"".join(hashlib.blake2b(f"{seed}\0{i}".encode(), digest_size=16).digest() for i in ids)
    words = np.frombuffer(digests, dtype=">u8").reshape(-1, 2).astype(np.uint64)
    is_val, key = words[:, 0] < np.uint64(threshold), words[:, 1]
    n = np.where(is_val, np.uint64(ranges[1]), np.uint64(ranges[0]))
    local = ((key >> np.uint64(32)) * n) >> np.uint64(32)  # < 2**32 ranges: no overflow, monotone in key
    return key, (local + np.where(is_val, np.uint64(ranges[0]), np.uint64(0))).astype(np.int64)


def scatter_unit(paths: tuple[str, ...], out: str, seed: int, threshold: int, ranges: tuple[int, int],
                 views_per_image: int = 1) -> bytes:
    """Write a unit's parts as one file, one row group per block of RANGES_PER_SHARD key
    ranges (blocks ascending; inside a block the groups of consecutive parts in unit order,
    each group's rows in stable key-range order); returns its (range, rows) pairs, also saved
    beside. Gather sorts a shard by (key, id) stably, so only which rows share a row group
    matters, and rows with equal key and id keep (part, row) order. Memory: the unit's rows
    once, plus one group of about SORT_BYTES. Each group is sorted on its own (a take on one
    chunk) and row groups are zero-copy slices of the sorted groups: a take across many
    parts' chunks would first concatenate whole columns."""
    parts, rngs, pending = [], [], []

    def sort_pending() -> None:  # one group of consecutive parts, as one chunk, by key range
        table = pa.concat_tables(pending).combine_chunks()
        pending.clear()
        key, rng = route(table.column("id").to_pylist(), seed, threshold, ranges)
        order = np.argsort(rng, kind="stable")
        rngs.append(rng[order])
        parts.append(table.take(pa.array(order)).append_column(KEY, pa.array(key[order], pa.uint64()))
                     .append_column(RANGE, pa.array(rngs[-1].astype(np.int32))))

    for path in paths:
        part = storage.read_parquet(path)
        check_schema(part, path, views_per_image)
        pending.append(part.cast(shard_schema(views_per_image)))
        if sum(t.nbytes for t in pending) >= SORT_BYTES:
            sort_pending()
    if pending:
        sort_pending()
    all_ranges = np.concatenate(rngs) if rngs else np.array([], np.int64)
    blocks = [rng // RANGES_PER_SHARD for rng in rngs]
    every_block = np.unique(all_ranges // RANGES_PER_SHARD)
    bounds = [np.searchsorted(b, every_block, side="left") for b in blocks]
    ends = [np.searchsorted(b, every_block, side="right") for b in blocks]
    schema = shard_schema(views_per_image).append(pa.field(KEY, pa.uint64())).append(pa.field(RANGE, pa.int32()))
    with storage.output_stream(out) as f, \
            pq.ParquetWriter(f, schema, compression="lz4", write_statistics=[RANGE]) as writer:
        for g in range(len(every_block)):
            pieces = [part.slice(int(lo[g]), int(hi[g] - lo[g])) for part, lo, hi in zip(parts, bounds, ends)
                      if hi[g] > lo[g]]
            rows = pa.concat_tables(pieces)
            writer.write_table(rows, row_group_size=rows.num_rows)
    uniq, n = np.unique(all_ranges, return_counts=True)
    sparse = np.stack([uniq, n], axis=1).astype("<i8").tobytes()
    storage.write_bytes(out + ".counts", sparse, durable=False)  # last: marks the file complete
    return sparse


def read_ranges(path: str, first: int, last: int) -> pa.Table:
    """The rows of key ranges [first, last] of one scatter file (only the row groups that hold them)."""
    fs, p = storage.filesystem(path)
    with fs.open_input_file(p) as f:
        pf = pq.ParquetFile(f)
        col = pf.schema_arrow.get_field_index(RANGE)
        groups = []
        for g in range(pf.metadata.num_row_groups):
            stats = pf.metadata.row_group(g).column(col).statistics
            if stats.max >= first and stats.min <= last:
                groups.append(g)
        table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
    keep = pc.and_(pc.greater_equal(table[RANGE], first), pc.less_equal(table[RANGE], last))
    return table.filter(keep)


def gather_shard(scatter_dir: str, files: int, first: int, last: int, offset: int, rows: int, out: str,
                 compression: str, compression_level: int | None, row_group_rows: int) -> dict:
    """Assemble one shard from every scatter file (unit order), sort, slice, write; returns its entry."""
    table = pa.concat_tables([read_ranges(scatter_path(scatter_dir, j), first, last) for j in range(files)])
    # stable: rows with the same key and id keep (part, row) order
    table = table.take(pc.sort_indices(table, [(KEY, "ascending"), ("id", "ascending")]))
    ids = table["id"]
    repeat = np.r_[False, pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False)] \
        if len(ids) else np.zeros(0, bool)
    table = table.slice(offset, rows).drop_columns([KEY, RANGE]).combine_chunks()
    entry = write_shard(table, out, compression, compression_level, row_group_rows)
    return entry | {"duplicate_ids": int(repeat[offset:offset + rows].sum())}


def write_shard(table: pa.Table, out: str, compression: str, compression_level: int | None,
                row_group_rows: int) -> dict:
    """Write one shard atomically; returns its manifest entry."""
    data = storage.parquet_bytes(table, compression, compression_level, row_group_rows)
    storage.write_bytes(out, data)
    counts = dict(zip(*np.unique(table["modality"].to_numpy(zero_copy_only=False), return_counts=True)))
    return {"rows": table.num_rows, "rows_by_modality": {m: int(counts.get(m, 0)) for m in MODALITIES},
            "bytes": len(data), "sha256": storage.sha256(data)}
