"""clean stage: read every source, filter, dedup; write kept and rejected rows.

Flow (one Ray session; three Ray Data executions):
1. the driver lists each source and splits it into units (files, tars, chunks of
   image files); a missing source path fails here, before any work;
2. map (Ray Data ``map_batches``, ``ray.cpus_per_task`` CPUs per task): read a
   unit, run every per-row step (pipelines.text_filters / image_filters),
   emit one row per input row, kept or rejected with a reason;
3. global dedup on the driver over metadata columns only (pipelines.dedup);
4. kept rows sorted by (kind, id) in one Ray Data sort and streamed to
   ``out_dir/{text,image,pair}/part-NNNNN.parquet`` in parts of ``part_rows``;
   rejected rows to ``out_dir/rejected/`` in input order.

Same inputs and params give byte-identical files: ids are content hashes, all
output order is a sort, and the encoders are deterministic. A local ``out_dir``
is written under a temporary sibling name and renamed into place at the end,
so an interrupted run never leaves a half-written ``out_dir`` behind.

Memory: image bytes live in Ray's object store (spilled to disk when large),
never all at once in the driver; the driver holds the metadata table (ids,
reasons, locations, MinHash signatures: ~1.2 KiB per text row, ~0.2 KiB per
image row), all rejected rows, and one output part at a time. Text files are
one unit each, so one huge file is read by one task (streaming, but serial).
"""
from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import storage
from pipelines.clean_rows import META_COLUMNS, ORDER, ROW_SCHEMA, STEPS, process_units, select_rows
from pipelines.configs import check
from pipelines.dedup import find_duplicates
from pipelines.image_filters import ImageFilterConfig
from pipelines.ray_session import ray_session
from pipelines.rejects import REJECTED_SCHEMA
from pipelines.sources import SourceConfig, plan_units
from pipelines.text_filters import PairFilterConfig, TextFilterConfig

KINDS = ("text", "image", "pair")
OUTPUT_SCHEMAS = {
    "text": pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string())]),
    "image": pa.schema([("id", pa.string()), ("image", pa.binary()), ("width", pa.int32()),
                        ("height", pa.int32()), ("source", pa.string())]),
    "pair": pa.schema([("id", pa.string()), ("image", pa.binary()), ("width", pa.int32()),
                       ("height", pa.int32()), ("caption", pa.string()), ("source", pa.string())]),
}
MAX_BLOCKS = 256


@dataclass(frozen=True)
class CleanConfig:
    out_dir: str = "data/clean"
    part_rows: int = 5000            # rows per output Parquet part (the last one may be short)
    files_per_unit: int = 64         # image files of a folder source read by one task
    max_file_mb: float = 64.0        # larger files / tar members are rejected unread
    max_line_bytes: int = 1_000_000  # longer txt/JSONL lines are rejected unread
    text: TextFilterConfig = field(default_factory=TextFilterConfig)
    image: ImageFilterConfig = field(default_factory=ImageFilterConfig)
    pair: PairFilterConfig = field(default_factory=PairFilterConfig)

    def __post_init__(self):
        check(bool(self.out_dir), "clean.out_dir: must not be empty")
        check(self.part_rows >= 1, "clean.part_rows: must be >= 1")
        check(self.files_per_unit >= 1, "clean.files_per_unit: must be >= 1")
        check(self.max_file_mb > 0, "clean.max_file_mb: must be > 0")
        check(self.max_line_bytes >= 1, "clean.max_line_bytes: must be >= 1")


def clean_sources(sources, cfg: CleanConfig, ray_cfg) -> dict:
    """Clean every source into ``cfg.out_dir``; returns the metrics of metrics/clean.json."""
    sources = tuple(sources)
    units = [{"source_idx": s, "unit_idx": u, "files": list(files)}
             for s, source in enumerate(sources)
             for u, files in enumerate(plan_units(source, cfg.files_per_unit))]
    staging = storage.staging_dir(cfg.out_dir)
    with ray_session(ray_cfg) as ray, _preserve_order(ray):
        rows = _map_rows(ray, units, sources, cfg, ray_cfg)
        meta = _collect(rows.select_columns(META_COLUMNS)) if rows is not None else _empty_meta()
        dups = [_duplicate_rows(meta, kind, cfg) for kind in KINDS]
        rejected = pa.concat_tables([meta.filter(pc.invert(meta.column("kept"))), *dups]).sort_by(ORDER)
        drop = pa.concat_tables(dups).column("row_key").to_pylist()
        parts = _write_kept(rows, drop, len(meta) - len(rejected), staging, cfg, ray_cfg)
    writer = PartWriter(staging, "rejected", cfg.part_rows)
    writer.add(rejected.select(REJECTED_SCHEMA.names))
    parts["rejected"] = writer.close()
    metrics = _metrics(sources, meta, rejected, parts)  # raises, leaving out_dir untouched, unless it reconciles
    storage.publish_dir(staging, cfg.out_dir)
    return metrics


def _map_rows(ray, units, sources, cfg, ray_cfg):
    """The per-row map, materialized in the object store (None when there is nothing to read)."""
    if not units:
        return None
    items = [{"unit": json.dumps(u)} for u in units]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
    return ds.map_batches(
        process_units, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"sources": sources, "cfg": cfg}, num_cpus=ray_cfg.cpus_per_task,
    ).materialize()


def _collect(ds) -> pa.Table:
    tables = [b.cast(_empty_meta().schema) for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    return pa.concat_tables(tables) if tables else _empty_meta()


def _empty_meta() -> pa.Table:
    return ROW_SCHEMA.empty_table().select(META_COLUMNS)


def _duplicate_rows(meta: pa.Table, kind: str, cfg: CleanConfig) -> pa.Table:
    """Kept rows of ``kind`` that dedup drops (visited in input order), relabelled as rejected."""
    kept = meta.filter(pc.and_(meta.column("kept"), pc.equal(meta.column("kind"), kind))).sort_by(ORDER)
    near = {"text": cfg.text.near_dedup, "image": cfg.image.near_dedup, "pair": cfg.pair.near_dedup}[kind]
    dups = find_duplicates(kept, kind, near=near, near_threshold=cfg.text.near_dedup_threshold,
                           num_perm=cfg.text.minhash_perms, phash_max_distance=cfg.image.phash_max_distance,
                           max_color_diff=cfg.image.near_dedup_max_color_diff)
    rows = kept.take(pa.array([d.index for d in dups], pa.int64()))
    for name, values in (("reason", [d.reason for d in dups]), ("detail", [d.detail for d in dups]),
                         ("step", [d.step for d in dups]), ("kept", [False] * len(dups))):
        rows = rows.set_column(rows.schema.get_field_index(name), name,
                               pa.array(values, rows.schema.field(name).type))
    return rows


def _write_kept(rows, drop: list[str], n_kept: int, out: str, cfg: CleanConfig, ray_cfg) -> dict:
    """Stream every kept row, sorted by (kind, id) in one Ray Data sort, into parts per kind."""
    writers = {kind: PartWriter(out, kind, cfg.part_rows) for kind in KINDS}
    if n_kept:
        columns = ["kind", "id", "image", "width", "height", "text", "source"]
        ds = rows.map_batches(select_rows, batch_format="pyarrow", num_cpus=ray_cfg.cpus_per_task,
                              fn_kwargs={"drop_keys": drop, "columns": columns}).sort(["kind", "id"])
        for batch in ds.iter_batches(batch_size=cfg.part_rows, batch_format="pyarrow"):
            for kind in KINDS:
                of_kind = batch.filter(pc.equal(batch.column("kind"), kind))
                if len(of_kind):
                    writers[kind].add(_output_table(of_kind, kind))
    stats = {kind: w.close() for kind, w in writers.items()}
    return {kind: st for kind, st in stats.items() if st["rows"]}


def _output_table(batch: pa.Table, kind: str) -> pa.Table:
    schema = OUTPUT_SCHEMAS[kind]
    named = batch.rename_columns(["caption" if c == "text" and kind == "pair" else c for c in batch.column_names])
    return pa.table([named.column(f.name).cast(f.type) for f in schema], schema=schema)


class PartWriter:
    """Write a stream of tables in order as ``out/name/part-NNNNN.parquet`` of exactly
    ``part_rows`` rows (the last may be short); holds at most one part plus one batch."""

    def __init__(self, out: str, name: str, part_rows: int):
        self.out, self.name, self.part_rows = out, name, part_rows
        self.buffer: list[pa.Table] = []
        self.stats = {"parts": 0, "rows": 0, "bytes": 0, "by_source": Counter()}

    def add(self, table: pa.Table) -> None:
        self.buffer.append(table)
        while sum(map(len, self.buffer)) >= self.part_rows:
            whole = pa.concat_tables(self.buffer)
            self._write(whole.slice(0, self.part_rows))
            self.buffer = [whole.slice(self.part_rows)]

    def close(self) -> dict:
        rest = pa.concat_tables(self.buffer) if self.buffer else None
        if rest is not None and len(rest):
            self._write(rest)
        self.buffer = []
        return self.stats

    def _write(self, table: pa.Table) -> None:
        table = table.combine_chunks()  # same bytes whatever the batch boundaries were
        path = storage.join(self.out, self.name, f"part-{self.stats['parts']:05d}.parquet")
        data = storage.write_parquet(table, path)
        self.stats["parts"] += 1
        self.stats["rows"] += len(table)
        self.stats["bytes"] += len(data)
        self.stats["by_source"].update(table.column("source").to_pylist())


@contextlib.contextmanager
def _preserve_order(ray):
    """Iterate Ray Data outputs in order (a sorted dataset must come back sorted)."""
    ctx = ray.data.DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = old


# ---------------------------------------------------------------- metrics

def _metrics(sources, meta: pa.Table, rejected: pa.Table, parts: dict) -> dict:
    """Per source rows_in / kept / rejected by reason, per kind step counts; raise unless
    every source reconciles (rows_in == kept + rejected)."""
    rows_in = Counter(meta.column("source").to_pylist())
    kept = Counter()
    for kind in KINDS:
        kept.update(parts.get(kind, {}).get("by_source", {}))
    reasons: dict[str, Counter] = {s.name: Counter() for s in sources}
    for name, reason in zip(rejected.column("source").to_pylist(), rejected.column("reason").to_pylist()):
        reasons[name][reason] += 1
    per_source = {}
    for s in sources:
        n_rej = sum(reasons[s.name].values())
        if rows_in[s.name] != kept[s.name] + n_rej:
            raise RuntimeError(f"clean: source {s.name!r} does not reconcile: rows_in {rows_in[s.name]} "
                               f"!= kept {kept[s.name]} + rejected {n_rej}")
        per_source[s.name] = {"kind": s.kind, "format": s.format, "path": s.path, "rows_in": rows_in[s.name],
                              "kept": kept[s.name], "rejected": n_rej, "rejected_by_reason": dict(sorted(reasons[s.name].items()))}
    kinds = {k: _kind_steps(k, meta, rejected, parts) for k in KINDS if k in set(meta.column("kind").to_pylist())}
    outputs = {k: {key: v for key, v in p.items() if key != "by_source"} for k, p in parts.items()}
    return {"rows_in": sum(rows_in.values()), "kept": sum(kept.values()), "rejected": len(rejected),
            "sources": per_source, "kinds": kinds, "outputs": outputs}


def _kind_steps(kind: str, meta: pa.Table, rejected: pa.Table, parts: dict) -> dict:
    """What each step of ``kind`` received, dropped and forwarded (datatrove-style stats)."""
    n = int(pc.sum(pc.equal(meta.column("kind"), kind)).as_py() or 0)
    rej = rejected.filter(pc.equal(rejected.column("kind"), kind))
    dropped = Counter(rej.column("step").to_pylist())
    steps, remaining = [], n
    for step in (["process"] if dropped.get("process") else []) + STEPS[kind]:
        steps.append({"step": step, "in": remaining, "dropped": dropped.get(step, 0),
                      "forwarded": remaining - dropped.get(step, 0)})
        remaining -= dropped.get(step, 0)
    kept = parts.get(kind, {}).get("rows", 0)
    if remaining != kept:
        raise RuntimeError(f"clean: {kind} steps forward {remaining} rows but {kept} were written")
    return {"rows_in": n, "kept": kept, "rejected": len(rej), "steps": steps}


__all__ = ["CleanConfig", "clean_sources", "OUTPUT_SCHEMAS"]
