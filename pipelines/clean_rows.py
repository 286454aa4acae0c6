"""The per-row half of ``clean``: Ray Data UDFs that read units and run every step.

:func:`process_units` is the map: one unit (file, tar, chunk of image files)
in, Arrow tables of :data:`ROW_SCHEMA` out, one row per input row whether kept
or rejected, flushed every few rows so a big tar never sits in memory whole.
The global dedup happens afterwards, on the driver, over metadata columns.
"""
from __future__ import annotations

import json
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.image_filters import IMAGE_STEPS
from pipelines.rejects import Reject, content_id, run_steps
from pipelines.sources import ReadLimits, Record, SourceConfig, read_unit
from pipelines.text_filters import CAPTION_STEPS, TEXT_STEPS, caption_id, minhash, text_id

ROW_SCHEMA = pa.schema([
    ("source_idx", pa.int32()), ("unit_idx", pa.int32()), ("row_idx", pa.int64()),
    ("row_key", pa.string()),        # "source:unit:row", unique per input row
    ("source", pa.string()), ("kind", pa.string()), ("location", pa.string()),
    ("kept", pa.bool_()), ("id", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("step", pa.string()),
    ("text", pa.string()),           # cleaned document, or the pair's caption
    ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
    ("minhash", pa.list_(pa.uint64())), ("phash", pa.uint64()),
    ("thumb", pa.binary()), ("caption_hash", pa.string()),
])
META_COLUMNS = [f.name for f in ROW_SCHEMA if f.name not in ("text", "image")]
ORDER = [("source_idx", "ascending"), ("unit_idx", "ascending"), ("row_idx", "ascending")]
FLUSH_ROWS = {"text": 1024, "image": 64, "pair": 64}

# Steps of each kind in order, for the forwarded/dropped counts in metrics.
STEPS = {
    "text": ["read", *(n for n, _ in TEXT_STEPS), "exact_dedup", "near_dedup"],
    "image": ["read", *(n for n, _ in IMAGE_STEPS), "exact_dedup", "near_dedup"],
    "pair": ["read", *(n for n, _ in CAPTION_STEPS), *(n for n, _ in IMAGE_STEPS), "exact_dedup", "near_dedup"],
}


def process_units(batch: pa.Table, sources: tuple[SourceConfig, ...], cfg) -> Iterator[pa.Table]:
    """Ray Data map_batches UDF: each row of ``batch`` is a JSON unit {source_idx, unit_idx, files}."""
    limits = ReadLimits(max_file_bytes=int(cfg.max_file_mb * 2**20), max_line_bytes=cfg.max_line_bytes)
    for unit in batch.column("unit").to_pylist():
        unit = json.loads(unit)
        source = sources[unit["source_idx"]]
        rows: list[dict] = []
        for row_idx, record in enumerate(read_unit(source, tuple(unit["files"]), limits)):
            row = process_record(record, source.kind, cfg)
            row.update(source_idx=unit["source_idx"], unit_idx=unit["unit_idx"], row_idx=row_idx,
                       row_key=f"{unit['source_idx']}:{unit['unit_idx']}:{row_idx}",
                       source=source.name, kind=source.kind, location=record.location)
            rows.append(row)
            if len(rows) >= FLUSH_ROWS[source.kind]:
                yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


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


def select_rows(batch: pa.Table, drop_keys: list[str], columns: list[str]) -> pa.Table:
    """Ray Data UDF: the kept rows that dedup did not drop, only ``columns``."""
    mask = batch.column("kept")
    if drop_keys:
        mask = pc.and_(mask, pc.invert(pc.is_in(batch.column("row_key"), value_set=pa.array(drop_keys, pa.string()))))
    return batch.filter(mask).select(columns)


__all__ = ["ROW_SCHEMA", "META_COLUMNS", "ORDER", "STEPS", "process_units", "process_record", "select_rows"]
