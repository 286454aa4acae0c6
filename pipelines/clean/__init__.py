"""clean stage: read every source, filter, dedup; write kept and rejected rows.

Flow (one Ray session); the driver's memory is O(sources + units + chunks +
shards + parts), never O(rows):
1. the driver lists each source and splits it into units (pipelines.clean.units:
   files, line-aligned byte ranges of large plain txt/JSONL files, runs of row
   groups of large Parquet files, tars, chunks of image files), so one big file
   spreads over every core; a missing source path fails here, before any work.
   Ray tasks count the newlines before each byte range (line numbers in
   locations stay the file's), and the number of dedup shards is fixed from the
   planned bytes (``clean.dedup_shard_rows`` estimated rows each);
2. map (Ray tasks of ``ray.cpus_per_task`` CPUs, one per CPU in flight): read a
   block of units, run every per-row step (pipelines.clean.text_filters / image_filters), and
   spill one row per input row, kept or rejected with a reason, to Parquet
   chunks in a work folder, with each chunk's dedup keys partitioned by shard
   (pipelines.clean.rows); only a summary per chunk comes back;
3. global dedup as sharded Ray tasks, each reading only its key partition, then
   one task that resolves near-duplicate chains (pipelines.clean.dedup_shards):
   every dropped row, in one file per chunk that has any. Metrics ``dedup``:
   ``shards``, ``key_files`` and ``bytes_read`` (the total size of the key
   partition files the shard tasks read: linear in rows whatever the shards);
4. the output pass as Ray tasks (pipelines.clean.outputs): kept rows minus
   dropped ones go to ``out_dir/{text,image,pair}/part-NNNNN.parquet``, rejected
   rows (the map's and dedup's, merged by order) to ``out_dir/rejected/``. Parts
   close at ``part_rows`` rows or ``part_bytes`` bytes over the whole input-ordered
   stream (pipelines.clean.parts); a planning task replays that rule over the
   rows' sizes, so parallel writers produce exactly the parts one sequential
   writer would. Output keeps input order, as datatrove and NeMo Curator do: a
   global sort by id would move every image through Ray's object store a second
   time, at more cost than cleaning small images; pack shuffles anyway.

Same inputs and params give byte-identical files: ids are content hashes, output
order is input order (sources, their sorted files, rows), whatever ran where and
however files were split into units, and the encoders are deterministic. A local ``out_dir``
is written under a temporary sibling name and renamed into place at the end,
so an interrupted run never leaves a half-written ``out_dir`` behind; the work
folder sits beside it (``<out_dir>.tmp-*-work``, cleared by the next run if this
one is killed).

Modules: sources.py (source declarations, readers), units.py (map units: file splitting, dedup
shard count), text_files.py (plain, .gz and .zst txt/jsonl lines, byte ranges), archive.py (safe tar streaming),
rejects.py (Reject, run_steps, content ids), text_filters.py / image_filters.py (the per-row
steps), rows.py (the map task that spills rows), dedup.py (dedup rules), dedup_shards.py
(key partitions, sharded dedup tasks), outputs.py (the parallel output pass), parts.py (bounded
output parts); this module drives the stage.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

from pipelines.clean.dedup import NearRules
from pipelines.clean.dedup_shards import dedup_shard, resolve
from pipelines.clean.image_filters import ImageFilterConfig
from pipelines.clean.outputs import OUTPUT_SCHEMAS, write_outputs
from pipelines.clean.rows import ORDER_BITS, STEPS, map_units
from pipelines.clean.text_files import count_newlines
from pipelines.clean.text_filters import PairFilterConfig, TextFilterConfig
from pipelines.clean.units import dedup_shards, newline_jobs, plan_units, with_newlines
from pipelines.common import storage
from pipelines.common.configs import check
from pipelines.common.ray_session import bounded_tasks, cluster_cpus, ray_session, spread_task
from pipelines.common.remote_outputs import StageOutput
from pipelines.common.schema import MODALITIES

MAX_BLOCKS = 256               # map tasks at most
UNITS_PER_BLOCK = 8            # map units per task unless that leaves < BLOCKS_PER_CPU tasks per CPU
BLOCKS_PER_CPU = 4


@dataclass(frozen=True)
class CleanConfig(StageOutput):
    part_rows: int = 5000            # rows per output Parquet part (the last one may be short)
    part_bytes: int = 64 * 2**20     # and at most this many bytes (strings/binaries + 8 per value)
    dedup_shard_rows: int = 100_000  # rows per dedup shard (Ray task), estimated from input bytes at planning
    unit_bytes: int = 64 * 2**20     # larger plain txt/JSONL and Parquet files are split into map units of about this
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
        check(self.unit_bytes >= 1, "clean.unit_bytes: must be >= 1")
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
    planned = [plan_units(source, cfg.files_per_unit, cfg.unit_bytes) for source in sources]
    staging = storage.staging_dir(cfg.data_dir)
    work = _work_dir(staging, cfg.data_dir)
    try:
        rules = cfg.near_rules()  # LSH band sizes: a numeric integration, so computed once
        with ray_session(ray_cfg) as ray:
            units, newlines = _number_lines(ray, planned, ray_cfg)
            shards = dedup_shards([(s.kind, source_units) for s, source_units in zip(sources, planned)],
                                  cfg.dedup_shard_rows, newlines)
            chunks = _map_rows(ray, units, (sources, cfg, rules, work, shards), ray_cfg)
            dropped, dedup = _dedup(ray, chunks, shards, rules, work, ray_cfg)
            dirs = (staging, work, storage.join(work, "dropped"))
            parts, rejected = write_outputs(ray, chunks, dropped, dirs, sources, cfg, ray_cfg)
        # raises, leaving out_dir untouched, unless it reconciles
        metrics = _metrics(sources, chunks, rejected, parts, dedup)
    finally:
        storage.remove(work)
    storage.publish_dir(staging, cfg.data_dir)
    return metrics


def _work_dir(staging: str, out_dir: str) -> str:
    """Scratch beside the staging dir (local: matched by staging_dir's stale-run cleanup)."""
    return storage.join(out_dir, "_work") if storage.is_uri(out_dir) else f"{staging}-work"


def _number_lines(ray, planned: list[list], ray_cfg) -> tuple[list[dict], dict[int, int]]:
    """Every unit as {source_idx, unit_idx, unit}, byte spans told the newlines before them,
    and the newlines of every counted unit by flat index (a Ray task per plain text unit
    counts its bytes' newlines)."""
    flat = [u for units in planned for u in units]
    task = spread_task(ray, count_newlines, ray_cfg.cpus_per_task)
    counts = dict(bounded_tasks(ray, task, newline_jobs(flat), cluster_cpus(ray), ray_cfg.no_progress_timeout_s))
    flat = iter(with_newlines(flat, counts))
    return [{"source_idx": s, "unit_idx": u, "unit": next(flat)}
            for s, units in enumerate(planned) for u in range(len(units))], counts


def _map_rows(ray, units, shared: tuple, ray_cfg) -> list[dict]:
    """The per-row map as plain Ray tasks, one per block of consecutive units (as pack; Ray
    Data's executor costs the driver CPU for as long as the map runs, and nothing comes back
    but chunk summaries); prints progress every ray.progress_log_s. Returns the spilled
    chunks' summaries in input order."""
    cpus = cluster_cpus(ray)
    n_blocks = _map_blocks(len(units), cpus)
    blocks = [units[k * len(units) // n_blocks:(k + 1) * len(units) // n_blocks] for k in range(n_blocks)]
    task = spread_task(ray, map_units, ray_cfg.cpus_per_task)
    shared = ray.put(shared)
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
    """Map tasks: UNITS_PER_BLOCK units each (every task's chunk is read again by the output
    pass, at a fixed cost per read), but at least BLOCKS_PER_CPU per CPU while units last
    (balance, progress), and at most MAX_BLOCKS."""
    return max(1, min(units, MAX_BLOCKS, max(BLOCKS_PER_CPU * cpus, math.ceil(units / UNITS_PER_BLOCK))))


def _dedup(ray, chunks: list[dict], shards: int, rules: NearRules, work: str, ray_cfg) -> tuple[dict[int, int], dict]:
    """Sharded exact + near dedup (pipelines.clean.dedup_shards) over the map's key partitions;
    returns ({first order: dropped rows} of the chunks that have dropped rows, the dedup metrics:
    shards, key files and bytes the shard tasks read)."""
    refs = ray.put([(c["first_order"], c["path"]) for c in chunks])
    task = spread_task(ray, dedup_shard, ray_cfg.cpus_per_task)
    keys, folder = storage.join(work, "keys"), storage.join(work, "dedup")
    jobs = {s: (keys, refs, s, rules, folder) for s in range(shards)}
    outputs = dict(bounded_tasks(ray, task, jobs, cluster_cpus(ray), ray_cfg.no_progress_timeout_s))
    outputs = [outputs[s] for s in range(shards)]
    final = spread_task(ray, resolve, ray_cfg.cpus_per_task)
    dropped = ray.get(final.remote(outputs, storage.join(work, "dropped"), [c["first_order"] for c in chunks]))
    return dropped, {"shards": shards, "key_files": sum(o["key_files"] for o in outputs),
                     "bytes_read": sum(o["key_bytes"] for o in outputs)}


# ---------------------------------------------------------------- metrics

def _metrics(sources, chunks: list[dict], rejected: Counter, parts: dict, dedup: dict) -> dict:
    """Per source rows_in / kept / rejected by reason, per kind step counts, ``dedup`` as given
    (see _dedup); raise unless every source yielded rows and reconciles (rows_in == kept + rejected)."""
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
            "sources": per_source, "kinds": kinds, "outputs": outputs, "dedup": dedup}


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
