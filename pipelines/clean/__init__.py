"""clean stage: read every source, filter, dedup; write kept and rejected rows.

Flow (one Ray session); the driver's memory is O(sources + chunks + shards),
never O(rows):
1. the driver lists each source and splits it into units (files, tars, chunks of
   image files); a missing source path fails here, before any work;
2. map (Ray tasks of ``ray.cpus_per_task`` CPUs, one per CPU in flight): read a
   block of units, run every per-row step (pipelines.clean.text_filters / image_filters), and
   spill one row per input row, kept or rejected with a reason, to Parquet
   chunks in a work folder (pipelines.clean.rows); only a summary per chunk
   comes back;
3. global dedup as sharded Ray tasks over the chunks, ``ceil(rows /
   dedup_shard_rows)`` shards of the id / LSH-band hash space, then one task
   that resolves near-duplicate chains (pipelines.clean.dedup_shards): every dropped
   row in ``dropped.parquet``;
4. one pass over the chunks in input order on the driver: kept rows minus
   dropped ones go to ``out_dir/{text,image,pair}/part-NNNNN.parquet``, rejected
   rows (the map's and dedup's, merged by order) to ``out_dir/rejected/``. Parts
   close at ``part_rows`` rows or ``part_bytes`` bytes, encoded as they fill and
   written atomically (pipelines.clean.parts). Output keeps input order, as
   datatrove and NeMo Curator do: a global sort by id would move every image
   through Ray's object store a second time, at more cost than cleaning small
   images; pack shuffles anyway. (At cluster scale this pass is the driver's only byte
   copy: read, filter, write; to parallelise it, cut parts per group of chunks
   in Ray tasks and number them afterwards.)

Same inputs and params give byte-identical files: ids are content hashes, output
order is input order (sources, their sorted files, rows), whatever ran where,
and the encoders are deterministic. A local ``out_dir``
is written under a temporary sibling name and renamed into place at the end,
so an interrupted run never leaves a half-written ``out_dir`` behind; the work
folder sits beside it (``<out_dir>.tmp-*-work``, cleared by the next run if this
one is killed).

Modules: sources.py (source declarations, units, readers), text_files.py (plain, .gz and .zst
txt/jsonl lines), archive.py (safe tar streaming),
rejects.py (Reject, run_steps, content ids), text_filters.py / image_filters.py (the per-row
steps), rows.py (the map task that spills rows), dedup.py (dedup rules), dedup_shards.py
(sharded dedup tasks), parts.py (bounded output parts); this module drives the stage.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.clean.dedup import NearRules
from pipelines.clean.dedup_shards import DROPPED_SCHEMA, dedup_shard, resolve
from pipelines.clean.image_filters import ImageFilterConfig
from pipelines.clean.parts import PartWriter
from pipelines.clean.rejects import REJECTED_SCHEMA
from pipelines.clean.rows import ORDER_BITS, STEPS, map_units
from pipelines.clean.sources import plan_units
from pipelines.clean.text_filters import PairFilterConfig, TextFilterConfig
from pipelines.common import storage
from pipelines.common.configs import check
from pipelines.common.ray_session import bounded_tasks, cluster_cpus, ray_session, spread_task
from pipelines.common.remote_outputs import StageOutput
from pipelines.common.schema import MODALITIES

OUTPUT_SCHEMAS = {
    "text": pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string())]),
    "image": pa.schema([("id", pa.string()), ("image", pa.binary()), ("width", pa.int32()),
                        ("height", pa.int32()), ("source", pa.string())]),
    "pair": pa.schema([("id", pa.string()), ("image", pa.binary()), ("width", pa.int32()),
                       ("height", pa.int32()), ("caption", pa.string()), ("source", pa.string())]),
}
MAX_BLOCKS = 256               # map tasks at most
UNITS_PER_BLOCK = 8            # map units per task unless that leaves < BLOCKS_PER_CPU tasks per CPU
BLOCKS_PER_CPU = 4
CHUNK_COLUMNS = ["order", "kept", "kind", "id", "image", "width", "height", "text", "source", "location",
                 "reason", "detail", "step"]


@dataclass(frozen=True)
class CleanConfig(StageOutput):
    part_rows: int = 5000            # rows per output Parquet part (the last one may be short)
    part_bytes: int = 64 * 2**20     # and at most this many bytes (strings/binaries + 8 per value)
    dedup_shard_rows: int = 100_000  # input rows per dedup shard (Ray task): bounds each task's memory
    files_per_unit: int = 64         # image files of a folder source read by one task
    max_file_mb: float = 64.0        # larger files / tar members are rejected unread
    max_line_bytes: int = 1_000_000  # longer txt/JSONL lines are rejected unread
    text: TextFilterConfig = field(default_factory=TextFilterConfig)
    image: ImageFilterConfig = field(default_factory=ImageFilterConfig)
    pair: PairFilterConfig = field(default_factory=PairFilterConfig)

    def __post_init__(self):
        super().__post_init__()
        check(self.part_rows >= 1, "clean.part_rows: must be >= 1")
        check(2**16 <= self.part_bytes <= 2**34, "clean.part_bytes: must be in [65536, 2**34] (64 KiB to 16 GiB)")
        check(self.dedup_shard_rows >= 1000, "clean.dedup_shard_rows: must be >= 1000")
        check(self.files_per_unit >= 1, "clean.files_per_unit: must be >= 1")
        check(self.max_file_mb > 0, "clean.max_file_mb: must be > 0")
        check(self.max_line_bytes >= 1, "clean.max_line_bytes: must be >= 1")

    def near_rules(self) -> NearRules:
        kinds = [k for k, on in (("text", self.text.near_dedup), ("image", self.image.near_dedup),
                                 ("pair", self.pair.near_dedup)) if on]
        return NearRules.build(kinds, self.text.near_dedup_threshold, self.text.minhash_perms,
                               self.image.phash_max_distance, self.image.near_dedup_max_color_diff)


def clean_sources(sources, cfg: CleanConfig, ray_cfg) -> dict:
    """Clean every source into ``cfg.data_dir``; returns the metrics of metrics/clean.json."""
    sources = tuple(sources)
    check(len(sources) <= 1 << ORDER_BITS[0], f"sources: at most {1 << ORDER_BITS[0]} sources")
    units = [{"source_idx": s, "unit_idx": u, "files": list(files)}
             for s, source in enumerate(sources)
             for u, files in enumerate(plan_units(source, cfg.files_per_unit))]
    staging = storage.staging_dir(cfg.data_dir)
    work = _work_dir(staging, cfg.data_dir)
    try:
        rules = cfg.near_rules()  # LSH band sizes: a numeric integration, so computed once
        with ray_session(ray_cfg) as ray:
            chunks = _map_rows(ray, units, sources, cfg, rules, work, ray_cfg)
            dropped = _dedup(ray, chunks, cfg, rules, work, ray_cfg)
        rejected = Counter()  # (source, kind, reason, step) -> rows
        parts = _write_outputs(chunks, dropped["path"], sources, staging, cfg, rejected)
        metrics = _metrics(sources, chunks, rejected, parts)  # raises, leaving out_dir untouched, unless it reconciles
    finally:
        storage.remove(work)
    storage.publish_dir(staging, cfg.data_dir)
    return metrics


def _work_dir(staging: str, out_dir: str) -> str:
    """Scratch beside the staging dir (local: matched by staging_dir's stale-run cleanup)."""
    return storage.join(out_dir, "_work") if storage.is_uri(out_dir) else f"{staging}-work"


def _map_rows(ray, units, sources, cfg, rules: NearRules, work, ray_cfg) -> list[dict]:
    """The per-row map as plain Ray tasks, one per block of consecutive units (as pack; Ray
    Data's executor costs the driver CPU for as long as the map runs, and nothing comes back
    but chunk summaries); prints progress every ray.progress_log_s. Returns the spilled
    chunks' summaries in input order."""
    cpus = cluster_cpus(ray)
    n_blocks = _map_blocks(len(units), cpus)
    blocks = [units[k * len(units) // n_blocks:(k + 1) * len(units) // n_blocks] for k in range(n_blocks)]
    task = spread_task(ray, map_units, ray_cfg.cpus_per_task)
    shared = ray.put((sources, cfg, rules, work))
    jobs = {k: (block, shared) for k, block in enumerate(blocks) if block}
    chunks, started, last = [], time.monotonic(), time.monotonic()
    for n, (_, written) in enumerate(bounded_tasks(ray, task, jobs, cpus, ray_cfg.no_progress_timeout_s), 1):
        chunks += written
        if time.monotonic() - last >= ray_cfg.progress_log_s or n == len(jobs):
            last = time.monotonic()
            print(f"clean: map {n}/{len(jobs)} tasks, {sum(c['rows'] for c in chunks)} rows in, "
                  f"{sum(c['kept'] for c in chunks)} kept so far, {last - started:.0f} s", flush=True)
    return sorted(chunks, key=lambda c: c["first_order"])


def _map_blocks(units: int, cpus: int) -> int:
    """Map tasks: UNITS_PER_BLOCK units each (every task's chunk is read again by every
    dedup shard and by the writer, at a fixed cost per read), but at least BLOCKS_PER_CPU per CPU while
    units last (balance, progress), and at most MAX_BLOCKS."""
    return max(1, min(units, MAX_BLOCKS, max(BLOCKS_PER_CPU * cpus, math.ceil(units / UNITS_PER_BLOCK))))


def _dedup(ray, chunks: list[dict], cfg: CleanConfig, rules: NearRules, work: str, ray_cfg) -> dict:
    """Sharded exact + near dedup (pipelines.clean.dedup_shards); returns resolve's summary."""
    paths = ray.put([c["path"] for c in chunks])
    shards = max(1, math.ceil(sum(c["rows"] for c in chunks) / cfg.dedup_shard_rows))
    task = spread_task(ray, dedup_shard, ray_cfg.cpus_per_task)
    folder = storage.join(work, "dedup")
    jobs = {s: (paths, s, shards, rules, folder) for s in range(shards)}
    outputs = dict(bounded_tasks(ray, task, jobs, cluster_cpus(ray), ray_cfg.no_progress_timeout_s))
    outputs = [outputs[s] for s in range(shards)]
    final = spread_task(ray, resolve, ray_cfg.cpus_per_task)
    return {**ray.get(final.remote(outputs, storage.join(work, "dropped.parquet"))), "shards": shards}


def _output_table(batch: pa.Table, kind: str) -> pa.Table:
    schema = OUTPUT_SCHEMAS[kind]
    named = batch.rename_columns(["caption" if c == "text" and kind == "pair" else c for c in batch.column_names])
    return pa.table([named.column(f.name).cast(f.type) for f in schema], schema=schema)


def _write_outputs(chunks, dropped_path, sources, out, cfg: CleanConfig, counts: Counter) -> dict:
    """Every chunk once, in input order: its kept rows that dedup did not drop into its kind's
    parts, its rejected rows and dedup's dropped ones (merged by order) into rejected/;
    counts (source, kind, reason, step) of the rejected rows. Returns part stats per name."""
    writers = {name: PartWriter(out, name, schema, cfg.part_rows, cfg.part_bytes)
               for name, schema in {**OUTPUT_SCHEMAS, "rejected": REJECTED_SCHEMA}.items()}
    dropped = OrderedReader(dropped_path)
    for k, chunk in enumerate(chunks):
        gone = dropped.below(chunks[k + 1]["first_order"] if k + 1 < len(chunks) else None)
        rows = storage.read_parquet(chunk["path"], columns=CHUNK_COLUMNS)
        source = sources[chunk["source_idx"]]  # every row in [first_order, next chunk's) is this chunk's
        kept = pc.and_(rows.column("kept"), pc.invert(pc.is_in(rows.column("order"), value_set=gone.column("order"))))
        if pc.any(kept).as_py():
            writers[source.kind].add(_output_table(rows.filter(kept), source.kind))
        rejected = rows.filter(pc.invert(rows.column("kept"))).select(DROPPED_SCHEMA.names)
        rejected = pa.concat_tables([rejected, gone]).sort_by("order")
        if len(rejected):
            rejected = rejected.append_column("source", pa.array([source.name] * len(rejected), pa.string()))
            counts.update((source.name, *r) for r in zip(*(rejected.column(c).to_pylist() for c in ("kind", "reason", "step"))))
            writers["rejected"].add(rejected.select(REJECTED_SCHEMA.names))
    stats = {name: w.close() for name, w in writers.items()}
    return {name: st for name, st in stats.items() if st["rows"] or name == "rejected"}


class OrderedReader:
    """Read a Parquet file sorted by ``order`` piece by piece: :meth:`below` returns the
    next rows with order < limit (all the rest for None), holding one batch at a time."""

    def __init__(self, path: str, batch_rows: int = 4096):
        fs, p = storage.filesystem(path)
        self.batches = pq.ParquetFile(fs.open_input_file(p)).iter_batches(batch_size=batch_rows)
        self.buffer = DROPPED_SCHEMA.empty_table()

    def below(self, limit: int | None) -> pa.Table:
        taken = []
        while True:
            if not len(self.buffer):
                batch = next(self.batches, None)
                if batch is None:
                    break
                self.buffer = pa.Table.from_batches([batch])
            orders = self.buffer.column("order").to_numpy()
            n = len(orders) if limit is None else int(np.searchsorted(orders, limit))
            taken.append(self.buffer.slice(0, n))
            self.buffer = self.buffer.slice(n)
            if len(self.buffer):
                break
        return pa.concat_tables(taken) if taken else DROPPED_SCHEMA.empty_table()


# ---------------------------------------------------------------- metrics

def _metrics(sources, chunks: list[dict], rejected: Counter, parts: dict) -> dict:
    """Per source rows_in / kept / rejected by reason, per kind step counts; raise unless
    every source yielded rows and reconciles (rows_in == kept + rejected)."""
    rows_in = Counter()
    for c in chunks:
        rows_in[sources[c["source_idx"]].name] += c["rows"]
    kept = Counter()
    for kind in MODALITIES:
        kept.update(parts.get(kind, {}).get("by_source", {}))
    reasons: dict[str, Counter] = {s.name: Counter() for s in sources}
    for (name, _, reason, _), n in rejected.items():
        reasons[name][reason] += n
    per_source = {}
    for s in sources:
        n_rej = sum(reasons[s.name].values())
        if not rows_in[s.name]:  # a corpus that vanished (wrong format, suffix, folder) must not pass unseen
            raise RuntimeError(f"clean: source {s.name!r} yielded no rows (none kept or rejected): no readable "
                               f"{s.format} file under {s.path!r}, or only empty ones; check its path and format")
        if rows_in[s.name] != kept[s.name] + n_rej:
            raise RuntimeError(f"clean: source {s.name!r} does not reconcile: rows_in {rows_in[s.name]} "
                               f"!= kept {kept[s.name]} + rejected {n_rej}")
        per_source[s.name] = {"kind": s.kind, "format": s.format, "path": s.path, "rows_in": rows_in[s.name],
                              "kept": kept[s.name], "rejected": n_rej, "rejected_by_reason": dict(sorted(reasons[s.name].items()))}
    kinds = {k: _kind_steps(k, sources, rows_in, rejected, parts) for k in MODALITIES
             if any(s.kind == k and rows_in[s.name] for s in sources)}
    outputs = {k: {key: v for key, v in p.items() if key != "by_source"} for k, p in parts.items()}
    return {"rows_in": sum(rows_in.values()), "kept": sum(kept.values()), "rejected": sum(rejected.values()),
            "sources": per_source, "kinds": kinds, "outputs": outputs}


def _kind_steps(kind: str, sources, rows_in: Counter, rejected: Counter, parts: dict) -> dict:
    """What each step of ``kind`` received, dropped and forwarded (datatrove-style stats)."""
    n = sum(rows_in[s.name] for s in sources if s.kind == kind)
    dropped = Counter()
    for (_, k, _, step), count in rejected.items():
        if k == kind:
            dropped[step] += count
    steps, remaining = [], n
    for step in (["process"] if dropped.get("process") else []) + STEPS[kind]:
        steps.append({"step": step, "in": remaining, "dropped": dropped.get(step, 0),
                      "forwarded": remaining - dropped.get(step, 0)})
        remaining -= dropped.get(step, 0)
    kept = parts.get(kind, {}).get("rows", 0)
    if remaining != kept:
        raise RuntimeError(f"clean: {kind} steps forward {remaining} rows but {kept} were written")
    return {"rows_in": n, "kept": kept, "rejected": sum(dropped.values()), "steps": steps}


__all__ = ["CleanConfig", "clean_sources", "OUTPUT_SCHEMAS"]
