"""pack stage: deterministic mixed-modality Parquet shards plus manifest.json.

How rows reach shards (bounded memory: no task copies more than one input part
or one output shard, the driver holds 33 bytes of plan per row, and Ray's object
store at most ``in_memory_mb`` of ordered parts):

1. plan (driver): read only the ``id`` column of every tokenized part. A
   16-byte blake2b of (seed, id) gives each row its split (first 8 bytes <
   val_fraction) and its sort key (last 8 bytes). Sorting each split by
   (key, part, row) is the shuffle; row rank // shard_rows is its shard and
   rank % shard_rows its position. Modalities mix because the key ignores them.
2. scatter (one Ray task per input part): read the part and order its rows by
   (shard, position). When the parts to read total at most ``in_memory_mb`` (on
   disk), the ordered part stays in Ray's object store (which itself spills to
   local disk if it fills up); otherwise it is spilled to ``out_dir/.spill/`` as
   an Arrow IPC file with one record batch per destination shard.
3. gather (one Ray task per shard): take that shard's rows from every ordered
   part (zero-copy slices of the stored objects, or its batch of each spill
   file), sort by position, write the Parquet shard atomically (temp + rename).
   Train and val shards are gathered together, one task per logical CPU in
   flight. (Small inputs stay in memory because the spill round trip and its
   per-shard file opens are a noticeable share of the tasks' time; larger ones
   spill so that memory stays bounded.)

Same inputs + params -> same plan -> byte-identical shards and manifest.
Resume: each finished shard is recorded (path, rows, bytes, sha256) in
``manifest.partial.json`` together with a fingerprint of the inputs, the
tokenizers and the params; a rerun keeps every shard whose file still has the
recorded sha256 and rewrites only the rest. ``manifest.json`` is written last.
"""
from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from pipelines.common import storage
from pipelines.common.configs import check
from pipelines.common.ray_session import RayConfig, bounded_tasks, cluster_cpus, ray_session, spread_task
from pipelines.common.remote_outputs import StageOutput
from pipelines.common.schema import MODALITIES, SHARD_SCHEMA, TOKENIZERS, check_schema

MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
SPILL = ".spill"
SPLITS = ("train", "val")
POS = "__pos"


@dataclass(frozen=True)
class PackConfig(StageOutput):
    shard_rows: int = 2000
    val_fraction: float = 0.05
    seed: int = 0
    compression: Literal["zstd", "snappy", "lz4", "gzip", "none"] = "zstd"
    compression_level: int | None = None    # null: the codec's default
    row_group_rows: int = 500               # readers stream a shard row group by row group
    in_memory_mb: float = 1024.0            # inputs up to this size (on disk) shuffle in Ray's object store

    def __post_init__(self):
        super().__post_init__()
        check(self.shard_rows >= 1, "pack.shard_rows: must be >= 1")
        check(self.in_memory_mb >= 0, "pack.in_memory_mb: must be >= 0")
        check(0.0 <= self.val_fraction < 1.0, "pack.val_fraction: must be in [0, 1)")
        check(self.row_group_rows >= 1, "pack.row_group_rows: must be >= 1")


@dataclass(frozen=True)
class ShardSpec:
    index: int      # global: train shards first, then val
    split: str
    path: str       # relative to out_dir, e.g. train/shard-00000.parquet
    rows: int


@dataclass(frozen=True)
class Plan:
    parts: list[str]
    dest: list[np.ndarray]   # per part: global shard index of each row
    pos: list[np.ndarray]    # per part: position of each row inside its shard
    shards: list[ShardSpec]
    fingerprint: str
    duplicate_ids: int


def pack_shards(cfg: PackConfig, tokenized_dir: str, ray_cfg: RayConfig) -> dict:
    """Shuffle every tokenized part into train/val shards + manifest.json; returns metrics."""
    start = time.time()
    parts = [p for m in MODALITIES for p in storage.list_files(storage.join(tokenized_dir, m), ".parquet")]
    if not parts:
        raise FileNotFoundError(f"{tokenized_dir}: no tokenized parts under text/, image/ or pair/")
    info_path = storage.join(tokenized_dir, TOKENIZERS)
    tokenizers = storage.read_json(info_path) if storage.exists(info_path) else {}
    plan = make_plan(cfg, parts, tokenizers)
    done = finished_shards(cfg.data_dir, plan)
    _write_partial(cfg.data_dir, plan, done)
    storage.remove(storage.join(cfg.data_dir, MANIFEST))
    _remove_stale(cfg.data_dir, keep=set(done))
    todo = [s for s in plan.shards if s.path not in done]
    if todo:
        with ray_session(ray_cfg) as ray:
            _run(ray, cfg, ray_cfg, plan, todo, done)
    storage.remove(storage.join(cfg.data_dir, SPILL))  # also a killed run's, when nothing was left to do
    manifest = build_manifest(cfg, plan, tokenizers, done)
    storage.write_json(storage.join(cfg.data_dir, MANIFEST), manifest)
    storage.remove(storage.join(cfg.data_dir, PARTIAL))
    seconds = time.time() - start
    return {"rows": manifest["rows"], "rows_by_modality": manifest["rows_by_modality"],
            "splits": manifest["splits"], "shards": len(plan.shards), "shards_written": len(todo),
            "shards_reused": len(plan.shards) - len(todo), "bytes": manifest["bytes"],
            "duplicate_ids": plan.duplicate_ids, "seconds": round(seconds, 2),
            "mb_per_s": round(manifest["bytes"] / 1e6 / max(seconds, 1e-9), 2)}


def make_plan(cfg: PackConfig, parts: list[str], tokenizers: dict) -> Plan:
    """Split and shard every row from its id alone (see the module docstring)."""
    threshold = int(cfg.val_fraction * 2.0**64)
    part_of, row_of, key_of, is_val, fp = [], [], [], [], hashlib.sha256()
    fp.update(json.dumps([cfg.content_params() | {"in_memory_mb": None}, tokenizers], sort_keys=True).encode())
    for j, path in enumerate(parts):
        table = storage.read_parquet(path, columns=["id"])
        ids = table.column("id").to_pylist()
        digests = b"".join(hashlib.blake2b(f"{cfg.seed}\0{i}".encode(), digest_size=16).digest() for i in ids)
        words = np.frombuffer(digests, dtype=">u8").reshape(-1, 2).astype(np.uint64)
        # A part's identity without reading its images: name, size, ids and its metadata
        # (tokenize stores there a fingerprint of the part's input, tokenizers and params).
        rel = "/".join(path.rsplit("/", 2)[-2:])
        metadata = sorted((table.schema.metadata or {}).items())
        fp.update(f"{rel}\0{_size(path)}\0{metadata}\0".encode() + digests)
        part_of.append(np.full(len(ids), j, np.int32))
        row_of.append(np.arange(len(ids), dtype=np.int32))
        key_of.append(words[:, 1])
        is_val.append(words[:, 0] < np.uint64(threshold))
    bounds = np.cumsum([0] + [len(rows) for rows in row_of])
    part_of, row_of, key_of, is_val = map(np.concatenate, (part_of, row_of, key_of, is_val))
    dest = np.empty(len(key_of), np.int64)
    pos = np.empty(len(key_of), np.int64)
    shards: list[ShardSpec] = []
    for split, mask in zip(SPLITS, (~is_val, is_val)):
        idx = np.flatnonzero(mask)
        order = idx[np.lexsort((row_of[idx], part_of[idx], key_of[idx]))]
        rank = np.arange(len(order))
        dest[order] = len(shards) + rank // cfg.shard_rows
        pos[order] = rank % cfg.shard_rows
        for k in range(-(-len(order) // cfg.shard_rows)):
            rows = min(cfg.shard_rows, len(order) - k * cfg.shard_rows)
            shards.append(ShardSpec(len(shards), split, f"{split}/shard-{k:05d}.parquet", rows))
    return Plan(parts=parts, dest=[dest[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
                pos=[pos[a:b] for a, b in zip(bounds[:-1], bounds[1:])], shards=shards,
                fingerprint=fp.hexdigest(), duplicate_ids=len(key_of) - len(np.unique(key_of)))


def _run(ray, cfg: PackConfig, ray_cfg: RayConfig, plan: Plan, todo: list[ShardSpec], done: dict) -> None:
    """Scatter the parts that feed unfinished shards, then gather those shards as they finish."""
    wanted = np.zeros(len(plan.shards), bool)
    wanted[[s.index for s in todo]] = True
    limit, timeout = cluster_cpus(ray), ray_cfg.no_progress_timeout_s
    remote = functools.partial(spread_task, ray, num_cpus=ray_cfg.cpus_per_task)
    inputs = {j: (path, np.where(wanted[plan.dest[j]], plan.dest[j], -1), plan.pos[j])
              for j, path in enumerate(plan.parts) if wanted[plan.dest[j]].any()}
    options = (cfg.compression, cfg.compression_level, cfg.row_group_rows)
    jobs = {}
    if sum(_size(path) for path, _, _ in inputs.values()) <= cfg.in_memory_mb * 2**20:
        # the ordered parts stay in the object store (at most in_memory_mb, compressed) until the end
        ordered = dict(bounded_tasks(ray, remote(order_part), inputs, limit, timeout, fetch=False))
        kept = {j: np.sort(dest[dest >= 0]) for j, (_, dest, _) in inputs.items()}  # ordered parts' shards
        for shard in todo:
            bounds = {j: np.searchsorted(d, [shard.index, shard.index + 1]).tolist() for j, d in kept.items()}
            bounds = {j: ab for j, ab in bounds.items() if ab[1] > ab[0]}
            jobs[shard] = (list(bounds.values()), storage.join(cfg.data_dir, shard.path), *options,
                           *[ordered[j] for j in bounds])  # top-level references: Ray resolves them
        gather = remote(gather_slices)
    else:
        spill_dir = storage.join(cfg.data_dir, SPILL)
        storage.remove(spill_dir)
        spills = {storage.join(spill_dir, f"part-{j:05d}.arrow"): args for j, args in inputs.items()}
        batches = dict(bounded_tasks(ray, remote(scatter_part), {spill: (path, spill, dest, pos)
                                 for spill, (path, dest, pos) in spills.items()}, limit, timeout))
        for shard in todo:
            sources = [(spill, idx[shard.index]) for spill, idx in batches.items() if shard.index in idx]
            jobs[shard] = (sources, storage.join(cfg.data_dir, shard.path), *options)
        gather = remote(gather_shard)
    last_write = time.time()
    for n, (shard, entry) in enumerate(bounded_tasks(ray, gather, jobs, limit, timeout), start=1):
        done[shard.path] = {"split": shard.split, **entry}
        if time.time() - last_write > 1.0 or n == len(jobs):  # bounded manifest rewriting
            _write_partial(cfg.data_dir, plan, done)
            last_write = time.time()


def order_part(path: str, dest: np.ndarray, pos: np.ndarray) -> pa.Table:
    """The rows of one part with ``dest >= 0`` ordered by (dest, pos), plus their position column."""
    table = storage.read_parquet(path)
    check_schema(table, path)
    keep = np.flatnonzero(dest >= 0)
    order = keep[np.lexsort((pos[keep], dest[keep]))]
    return table.cast(SHARD_SCHEMA).take(pa.array(order)).append_column(POS, pa.array(pos[order])).combine_chunks()


def scatter_part(path: str, spill: str, dest: np.ndarray, pos: np.ndarray) -> dict[int, int]:
    """Spill the rows of one part with ``dest >= 0``, one IPC batch per shard; returns {shard: batch}."""
    batch = order_part(path, dest, pos).to_batches()[0]
    dests = np.sort(dest[dest >= 0])
    starts = np.flatnonzero(np.r_[True, dests[1:] != dests[:-1]])
    ends = np.r_[starts[1:], len(dests)]
    fs, p = storage.filesystem(spill)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as sink, ipc.new_file(sink, batch.schema) as writer:
        for a, b in zip(starts, ends):
            writer.write_batch(batch.slice(a, b - a))
    return {int(dests[a]): i for i, a in enumerate(starts)}


def gather_shard(sources: list[tuple[str, int]], out: str, compression: str,
                 compression_level: int | None, row_group_rows: int) -> dict:
    """Merge one shard's spilled batches in plan order and write it; returns its manifest entry."""
    batches = []
    for spill, index in sources:
        fs, p = storage.filesystem(spill)
        with fs.open_input_file(p) as f:
            batches.append(ipc.open_file(f).get_batch(index))  # reads only this shard's batch
    return write_shard(pa.Table.from_batches(batches), out, compression, compression_level, row_group_rows)


def gather_slices(slices: list[tuple[int, int]], out: str, compression: str, compression_level: int | None,
                  row_group_rows: int, *parts: pa.Table) -> dict:
    """Merge one shard's row ranges of the ordered parts (``order_part``) and write it."""
    table = pa.concat_tables([part.slice(a, b - a) for part, (a, b) in zip(parts, slices)])
    return write_shard(table, out, compression, compression_level, row_group_rows)


def write_shard(table: pa.Table, out: str, compression: str, compression_level: int | None,
                row_group_rows: int) -> dict:
    """Sort one shard's rows by position, write it atomically; returns its manifest entry."""
    table = table.take(pc.sort_indices(table[POS])).drop_columns([POS]).combine_chunks()
    data = parquet_bytes(table, compression, compression_level, row_group_rows)
    storage.write_bytes(out, data)
    counts = dict(zip(*np.unique(table["modality"].to_numpy(zero_copy_only=False), return_counts=True)))
    return {"rows": table.num_rows, "rows_by_modality": {m: int(counts.get(m, 0)) for m in MODALITIES},
            "bytes": len(data), "sha256": storage.sha256(data)}


def parquet_bytes(table: pa.Table, compression: str, compression_level: int | None,
                  row_group_rows: int) -> pa.Buffer:
    """Serialize in memory (no copy to ``bytes``): the same table and options give the same bytes."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression, compression_level=compression_level,
                   row_group_size=row_group_rows, write_statistics=True)
    return sink.getvalue()


def finished_shards(out_dir: str, plan: Plan) -> dict[str, dict]:
    """Entries of a previous run with this plan's fingerprint whose file still has its sha256."""
    previous = {}
    for name in (PARTIAL, MANIFEST):
        path = storage.join(out_dir, name)
        if storage.exists(path):
            recorded = storage.read_json(path)
            if recorded.get("fingerprint") == plan.fingerprint:
                entries = recorded["shards"]
                previous.update(entries if isinstance(entries, dict) else {e["path"]: e for e in entries})
    wanted = {s.path for s in plan.shards}
    done = {}
    for rel, entry in sorted(previous.items()):
        path = storage.join(out_dir, rel)
        if rel in wanted and storage.exists(path) and storage.sha256_file(path) == entry["sha256"]:
            done[rel] = {k: v for k, v in entry.items() if k != "path"}
    return done


def build_manifest(cfg: PackConfig, plan: Plan, tokenizers: dict, done: dict) -> dict:
    shards = [{"path": s.path, **done[s.path]} for s in plan.shards]
    by_split = {split: [e for e in shards if e["split"] == split] for split in SPLITS}
    return {
        "format": "parquet", "compression": cfg.compression, "schema": [f.name for f in SHARD_SCHEMA],
        "seed": cfg.seed, "shard_rows": cfg.shard_rows, "val_fraction": cfg.val_fraction,
        "tokenizers": tokenizers, "fingerprint": plan.fingerprint,
        "rows": sum(e["rows"] for e in shards), "bytes": sum(e["bytes"] for e in shards),
        "rows_by_modality": _modality_totals(shards),
        "splits": {split: {"shards": len(es), "rows": sum(e["rows"] for e in es),
                           "rows_by_modality": _modality_totals(es)} for split, es in by_split.items()},
        "shards": shards,
    }


def _modality_totals(entries: list[dict]) -> dict[str, int]:
    return {m: sum(e["rows_by_modality"][m] for e in entries) for m in MODALITIES}


def _write_partial(out_dir: str, plan: Plan, done: dict) -> None:
    storage.write_json(storage.join(out_dir, PARTIAL), {"fingerprint": plan.fingerprint, "shards": done})


def _remove_stale(out_dir: str, keep: set[str]) -> None:
    """Delete shard files that are not finished shards of this plan, and temp files of killed writes."""
    for split in SPLITS:
        base = storage.join(out_dir, split)
        for path in storage.list_files(base):
            if f"{split}/{path[len(base) + 1:]}" not in keep:
                storage.remove(path)
    storage.remove_temp_files(out_dir)


def _size(path: str) -> int:
    fs, p = storage.filesystem(path)
    return fs.get_file_info(p).size
