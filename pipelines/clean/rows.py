"""The per-row half of ``clean``: the Ray task that reads units and runs every step.

:func:`map_units` is the map: a block of consecutive units (pipelines.clean.units:
files, parts of a large file, tars, chunks of image files) in, one row of
:data:`ROW_SCHEMA` per input row whether kept or rejected, spilled to Parquet
chunks ``<work>/rows/<order of first row>.parquet`` (consecutive units of one
source, at most ``CHUNK_BYTES`` each, written atomically, so a retried task
rewrites the same files) and only a summary per chunk returned: the map holds a
few rows and one encoded chunk, never a whole unit. Beside each chunk it writes
the chunk's dedup keys partitioned by dedup shard (``<work>/keys/<shard>/``,
pipelines.clean.dedup_shards.write_keys), so the global dedup that follows, in
sharded Ray tasks, reads each key once.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.clean.dedup_shards import KEY_COLUMNS, write_keys
from pipelines.clean.image_filters import IMAGE_STEPS
from pipelines.clean.parts import compression
from pipelines.clean.rejects import Reject, content_id, run_steps
from pipelines.clean.sources import ReadLimits, Record, read_unit
from pipelines.clean.text_filters import CAPTION_STEPS, TEXT_STEPS, caption_id, minhash, text_id
from pipelines.common import storage

ROW_SCHEMA = pa.schema([
    ("order", pa.int64()),           # input order as one number: row_order(source, unit, row)
    ("source_idx", pa.int32()), ("unit_idx", pa.int32()), ("row_idx", pa.int64()),
    ("row_key", pa.string()),        # "source:unit:row", unique per input row
    ("source", pa.string()), ("kind", pa.string()), ("location", pa.string()),
    ("kept", pa.bool_()), ("id", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("step", pa.string()),
    ("text", pa.string()),           # cleaned document, or the pair's caption
    ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
    ("minhash", pa.list_(pa.uint64())), ("phash", pa.uint64()),
    ("thumb", pa.binary()), ("caption_hash", pa.string()),
    ("bands", pa.list_(pa.uint64())),  # near-dedup bucket keys (NearRules.bands), null if off
])
FLUSH_ROWS = {"text": 1024, "image": 64, "pair": 64}
CHUNK_BYTES = 8 * 2**20         # encoded bytes after which a spilled chunk is closed: every later phase
                                # holds one decoded chunk (a text row's MinHash alone is 8 bytes x
                                # clean.text.minhash_perms)
ORDER_BITS = (10, 24, 29)       # bits of source, unit, row in ``order``


def row_order(source_idx: int, unit_idx: int, row_idx: int) -> int:
    """One int64 that sorts like (source_idx, unit_idx, row_idx)."""
    for value, bits, what in zip((source_idx, unit_idx, row_idx), ORDER_BITS, ("sources", "units of a source",
                                                                               "rows in one unit (file)")):
        if not 0 <= value < 1 << bits:
            raise ValueError(f"clean: more than {1 << bits} {what}; split the input")
    return (source_idx << (ORDER_BITS[1] + ORDER_BITS[2])) | (unit_idx << ORDER_BITS[2]) | row_idx

# Steps of each kind in order, for the forwarded/dropped counts in metrics.
STEPS = {
    "text": ["read", *(n for n, _ in TEXT_STEPS), "exact_dedup", "near_dedup"],
    "image": ["read", *(n for n, _ in IMAGE_STEPS), "exact_dedup", "near_dedup"],
    "pair": ["read", *(n for n, _ in CAPTION_STEPS), *(n for n, _ in IMAGE_STEPS), "exact_dedup", "near_dedup"],
}


def map_units(units: list[dict], shared: tuple) -> list[dict]:
    """Ray task: ``units`` ({source_idx, unit_idx, unit: Unit}), consecutive in input order, and
    ``shared`` = (sources, CleanConfig, NearRules, work folder, dedup shards); spills every row
    and its dedup keys and returns one summary per chunk written: {path, first_order,
    source_idx, rows, kept, bytes}. A chunk spans units of one source (few, large files:
    every later phase pays a fixed cost per chunk read)."""
    sources, cfg, rules, work, num_shards = shared
    limits = ReadLimits(max_file_bytes=int(cfg.max_file_mb * 2**20), max_line_bytes=cfg.max_line_bytes)
    written, spill = [], None
    for unit in units:
        s, u = unit["source_idx"], unit["unit_idx"]
        if spill is None or spill.source_idx != s:
            written += spill.close() if spill else []
            spill = ChunkSpiller(work, s, num_shards)
        source, rows = sources[s], []
        for row_idx, record in enumerate(read_unit(source, unit["unit"], limits)):
            row = process_record(record, source.kind, cfg)
            row.update(order=row_order(s, u, row_idx), source_idx=s, unit_idx=u, row_idx=row_idx,
                       row_key=f"{s}:{u}:{row_idx}", source=source.name, kind=source.kind, location=record.location)
            if row["kept"]:
                row["bands"] = rules.bands(source.kind, row)
            rows.append(row)
            if len(rows) >= FLUSH_ROWS[source.kind]:
                spill.add(pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
                rows = []
        if rows:
            spill.add(pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    return written + (spill.close() if spill else [])


class ChunkSpiller:
    """Encode row tables as row groups of one Parquet file in memory; write it (atomically,
    named by its first row's order) once it reaches CHUNK_BYTES, and at close, with its dedup
    keys partitioned into ``num_shards`` shards."""

    def __init__(self, work: str, source_idx: int, num_shards: int):
        self.folder, self.keys = storage.join(work, "rows"), storage.join(work, "keys")
        self.source_idx, self.num_shards = source_idx, num_shards
        self.written: list[dict] = []
        self.sink = self.writer = None
        self.key_rows: list[pa.Table] = []

    def add(self, table: pa.Table) -> None:
        if self.writer is None:
            self.sink = pa.BufferOutputStream()
            self.writer = pq.ParquetWriter(self.sink, ROW_SCHEMA, compression=compression(ROW_SCHEMA))
            self.first, self.rows, self.kept = table.column("order")[0].as_py(), 0, 0
        self.writer.write_table(table, row_group_size=len(table))
        self.key_rows.append(table.select(KEY_COLUMNS))
        self.rows += len(table)
        self.kept += int(pc.sum(table.column("kept")).as_py() or 0)
        if self.sink.tell() >= CHUNK_BYTES:
            self.close()

    def close(self) -> list[dict]:
        """Write the open chunk, if any; returns the summaries of every chunk written so far."""
        if self.writer is not None:
            self.writer.close()
            path, data = storage.join(self.folder, f"{self.first:019d}.parquet"), self.sink.getvalue()
            write_keys(self.keys, self.first, pa.concat_tables(self.key_rows), self.num_shards)
            storage.write_bytes(path, data, durable=False)  # scratch: a killed run's work folder is cleared
            self.written.append({"path": path, "first_order": self.first, "source_idx": self.source_idx,
                                 "rows": self.rows, "kept": self.kept, "bytes": data.size})
            self.sink = self.writer = None
            self.key_rows = []
        return self.written


def process_record(record: Record, kind: str, cfg) -> dict:
    """Run the kind's steps on one record: a kept row, or a rejected one with its reason."""
    try:
        if record.reject is not None:
            record.reject.step = "read"
            raise record.reject
        return {"text": _text, "image": _image, "pair": _pair}[kind](record, cfg)
    except Reject as rej:
        return _rejected(record, rej.reason, rej.detail, rej.step or "read")
    except Exception as err:  # noqa: BLE001 - one strange row must not fail the stage; it is recorded
        return _rejected(record, "unexpected_error", f"{type(err).__name__}: {err}", "process")


def _rejected(record: Record, reason: str, detail: str, step: str) -> dict:
    return {"kept": False, "id": content_id(b"raw", record.raw), "reason": reason, "detail": detail, "step": step}


def _text(record: Record, cfg) -> dict:
    text = run_steps(TEXT_STEPS, record.text, cfg.text)
    sig = minhash(text, cfg.text.minhash_perms, cfg.text.minhash_ngram) if cfg.text.near_dedup else None
    return {"kept": True, "id": text_id(text), "text": text, "minhash": sig}


def _image(record: Record, cfg) -> dict:
    im = run_steps(IMAGE_STEPS, record.image, cfg.image)
    return {"kept": True, "id": im.id, "image": im.data, "width": im.width, "height": im.height,
            "phash": im.phash, "thumb": im.thumb}


def _pair(record: Record, cfg) -> dict:
    caption = run_steps(CAPTION_STEPS, record.text, cfg.pair)  # cheap checks before decoding
    row = _image(record, cfg)
    row.update(id=content_id(b"pair", row["id"].encode(), caption.encode("utf-8")),
               text=caption, caption_hash=caption_id(caption))
    return row


__all__ = ["ROW_SCHEMA", "STEPS", "ChunkSpiller", "map_units", "process_record", "row_order"]
