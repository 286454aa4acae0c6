"""clean stage: read every source, filter, dedup; write kept and rejected rows.

Flow (one Ray session); the driver's memory is O(sources + chunks + shards),
never O(rows):
1. the driver lists each source and splits it into units (files, tars, chunks of
   image files); a missing source path fails here, before any work;
2. map (Ray Data ``map_batches``, ``ray.cpus_per_task`` CPUs per task): read a
   unit, run every per-row step (pipelines.text_filters / image_filters), and
   spill one row per input row, kept or rejected with a reason, to Parquet
   chunks in a work folder (pipelines.clean_rows); only a summary per chunk
   comes back;
3. global dedup as sharded Ray tasks over the chunks, ``ceil(rows /
   dedup_shard_rows)`` shards of the id / LSH-band hash space, then one task
   that resolves near-duplicate chains (pipelines.dedup_shards): every dropped
   row in ``dropped.parquet``;
4. kept rows minus dropped ones, sorted by (kind, id) in one Ray Data sort and
   streamed to ``out_dir/{text,image,pair}/part-NNNNN.parquet``; rejected rows
   (the map's and dedup's, merged by input order) streamed to ``out_dir/rejected/``.
   Parts close at ``part_rows`` rows or ``part_bytes`` bytes, encoded as they fill
   and written atomically (pipelines.clean_parts).

Same inputs and params give byte-identical files: ids are content hashes, all
output order is a sort, and the encoders are deterministic. A local ``out_dir``
is written under a temporary sibling name and renamed into place at the end,
so an interrupted run never leaves a half-written ``out_dir`` behind; the work
folder sits beside it (``<out_dir>.tmp-*-work``, cleared by the next run if this
one is killed).
"""
from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.clean_parts import PartWriter
from pipelines.clean_rows import ORDER_BITS, STEPS, process_units, read_kept
from pipelines.configs import check
from pipelines.dedup import NearRules
from pipelines.dedup_shards import DROPPED_SCHEMA, dedup_shard, resolve
from pipelines.image_filters import ImageFilterConfig
from pipelines.ray_session import ray_session
from pipelines.rejects import REJECTED_SCHEMA
from pipelines.sources import plan_units
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
SORT_BLOCK_BYTES = 64 * 2**20    # spilled chunk bytes per block of the kept-row sort
KEPT_COLUMNS = ["kind", "id", "image", "width", "height", "text", "source"]


@dataclass(frozen=True)
class CleanConfig:
    out_dir: str = "data/clean"
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
        check(bool(self.out_dir), "clean.out_dir: must not be empty")
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
    """Clean every source into ``cfg.out_dir``; returns the metrics of metrics/clean.json."""
    sources = tuple(sources)
    check(len(sources) <= 1 << ORDER_BITS[0], f"sources: at most {1 << ORDER_BITS[0]} sources")
    units = [{"source_idx": s, "unit_idx": u, "files": list(files)}
             for s, source in enumerate(sources)
             for u, files in enumerate(plan_units(source, cfg.files_per_unit))]
    staging = storage.staging_dir(cfg.out_dir)
    work = _work_dir(staging, cfg.out_dir)
    try:
        with ray_session(ray_cfg) as ray, _preserve_order(ray):
            chunks = _map_rows(ray, units, sources, cfg, work, ray_cfg)
            dropped = _dedup(ray, chunks, cfg, work, ray_cfg)
            parts = _write_kept(ray, chunks, dropped, staging, cfg, ray_cfg)
        rejected = Counter()  # (source, kind, reason, step) -> rows
        parts["rejected"] = _write_rejected(chunks, dropped["path"], sources, staging, cfg, rejected)
        metrics = _metrics(sources, chunks, rejected, parts)  # raises, leaving out_dir untouched, unless it reconciles
    finally:
        storage.remove(work)
    storage.publish_dir(staging, cfg.out_dir)
    return metrics


def _work_dir(staging: str, out_dir: str) -> str:
    """Scratch beside the staging dir (local: matched by staging_dir's stale-run cleanup)."""
    return storage.join(out_dir, "_work") if storage.is_uri(out_dir) else f"{staging}-work"


def _map_rows(ray, units, sources, cfg, work, ray_cfg) -> list[dict]:
    """The per-row map; returns the spilled chunks' summaries in input order."""
    if not units:
        return []
    items = [{"unit": json.dumps(u)} for u in units]
    blocks = min(len(items), MAX_BLOCKS)
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(
        process_units, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"sources": sources, "cfg": cfg, "rules": cfg.near_rules(), "work": work},
        num_cpus=ray_cfg.cpus_per_task, compute=_task_pool(blocks),
    )
    chunks = [c for b in ds.iter_batches(batch_size=None, batch_format="pyarrow") for c in b.to_pylist()]
    return sorted(chunks, key=lambda c: c["first_order"])


def _task_pool(blocks: int):
    """At most one task per logical CPU (as pack): Ray reuses its idle workers instead of
    starting one per fractional-CPU slot (each start imports ray.data, ~1.3 CPU-s). Never
    more than the input blocks, which Ray Data would warn about in every small run."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return ray.data.TaskPoolStrategy(size=max(1, min(cpus, blocks)))


def _dedup(ray, chunks: list[dict], cfg: CleanConfig, work: str, ray_cfg) -> dict:
    """Sharded exact + near dedup (pipelines.dedup_shards); returns resolve's summary."""
    paths = ray.put([c["path"] for c in chunks])
    shards = max(1, math.ceil(sum(c["rows"] for c in chunks) / cfg.dedup_shard_rows))
    task = ray.remote(dedup_shard).options(num_cpus=ray_cfg.cpus_per_task)
    rules, folder = cfg.near_rules(), storage.join(work, "dedup")
    outputs = ray.get([task.remote(paths, s, shards, rules, folder) for s in range(shards)])
    final = ray.remote(resolve).options(num_cpus=ray_cfg.cpus_per_task)
    return {**ray.get(final.remote(outputs, storage.join(work, "dropped.parquet"))), "shards": shards}


def _write_kept(ray, chunks: list[dict], dropped: dict, out: str, cfg: CleanConfig, ray_cfg) -> dict:
    """Stream every kept row, sorted by (kind, id) in one Ray Data sort, into parts per kind."""
    writers = {kind: PartWriter(out, kind, OUTPUT_SCHEMAS[kind], cfg.part_rows, cfg.part_bytes) for kind in KINDS}
    if sum(c["kept"] for c in chunks) > dropped["rows"]:
        ends = [c["first_order"] for c in chunks[1:]] + [2**63 - 1]
        items = [{"path": c["path"], "first_order": c["first_order"], "end_order": end}
                 for c, end in zip(chunks, ends) if c["kept"]]
        blocks = _sort_blocks(chunks, len(items))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(read_kept, batch_size=None, batch_format="pyarrow", num_cpus=ray_cfg.cpus_per_task,
                            compute=_task_pool(blocks), fn_kwargs={"dropped_path": dropped["path"], "columns": KEPT_COLUMNS})
        for batch in ds.sort(["kind", "id"]).iter_batches(batch_size=256, batch_format="pyarrow"):
            for kind in KINDS:
                of_kind = batch.filter(pc.equal(batch.column("kind"), kind))
                if len(of_kind):
                    writers[kind].add(_output_table(of_kind, kind))
    stats = {kind: w.close() for kind, w in writers.items()}
    return {kind: st for kind, st in stats.items() if st["rows"]}


def _sort_blocks(chunks: list[dict], n_items: int) -> int:
    """Blocks (so sort partitions) for the kept rows: one per SORT_BLOCK_BYTES of spilled
    chunks. Every block costs a read, a sort-map and a sort-reduce task (~10-20 ms of Ray CPU
    each); one block per chunk made the sort of 1000 small images cost more than cleaning them."""
    spilled = sum(c["bytes"] for c in chunks if c["kept"])
    return max(1, min(n_items, MAX_BLOCKS, math.ceil(spilled / SORT_BLOCK_BYTES)))


def _output_table(batch: pa.Table, kind: str) -> pa.Table:
    schema = OUTPUT_SCHEMAS[kind]
    named = batch.rename_columns(["caption" if c == "text" and kind == "pair" else c for c in batch.column_names])
    return pa.table([named.column(f.name).cast(f.type) for f in schema], schema=schema)


def _write_rejected(chunks, dropped_path, sources, out, cfg: CleanConfig, counts: Counter) -> dict:
    """Rejected rows of the map and of dedup, merged in input order, streamed into parts;
    counts (source, kind, reason, step) as they pass."""
    writer = PartWriter(out, "rejected", REJECTED_SCHEMA, cfg.part_rows, cfg.part_bytes)
    dropped = OrderedReader(dropped_path)
    for k, chunk in enumerate(chunks):
        limit = chunks[k + 1]["first_order"] if k + 1 < len(chunks) else None
        rows = dropped.below(limit)
        if chunk["kept"] < chunk["rows"]:  # the map rejected some of its rows: read them
            rejected = storage.read_parquet(chunk["path"], columns=["kept", *DROPPED_SCHEMA.names])
            rejected = rejected.filter(pc.invert(rejected.column("kept"))).select(DROPPED_SCHEMA.names)
            rows = pa.concat_tables([rejected, rows]).sort_by("order")
        if not len(rows):
            continue
        source = sources[chunk["source_idx"]].name  # every row in [first_order, limit) is this chunk's
        rows = rows.append_column("source", pa.array([source] * len(rows), pa.string()))
        counts.update((source, *r) for r in zip(*(rows.column(c).to_pylist() for c in ("kind", "reason", "step"))))
        writer.add(rows.select(REJECTED_SCHEMA.names))
    return writer.close()


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

def _metrics(sources, chunks: list[dict], rejected: Counter, parts: dict) -> dict:
    """Per source rows_in / kept / rejected by reason, per kind step counts; raise unless
    every source reconciles (rows_in == kept + rejected)."""
    rows_in = Counter()
    for c in chunks:
        rows_in[sources[c["source_idx"]].name] += c["rows"]
    kept = Counter()
    for kind in KINDS:
        kept.update(parts.get(kind, {}).get("by_source", {}))
    reasons: dict[str, Counter] = {s.name: Counter() for s in sources}
    for (name, _, reason, _), n in rejected.items():
        reasons[name][reason] += n
    per_source = {}
    for s in sources:
        n_rej = sum(reasons[s.name].values())
        if rows_in[s.name] != kept[s.name] + n_rej:
            raise RuntimeError(f"clean: source {s.name!r} does not reconcile: rows_in {rows_in[s.name]} "
                               f"!= kept {kept[s.name]} + rejected {n_rej}")
        per_source[s.name] = {"kind": s.kind, "format": s.format, "path": s.path, "rows_in": rows_in[s.name],
                              "kept": kept[s.name], "rejected": n_rej, "rejected_by_reason": dict(sorted(reasons[s.name].items()))}
    kinds = {k: _kind_steps(k, sources, rows_in, rejected, parts) for k in KINDS
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
