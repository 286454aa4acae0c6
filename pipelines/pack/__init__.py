"""pack stage: deterministic mixed-modality Parquet shards plus manifest.json.

No process holds a per-row plan: rows are routed by a hash of their id (scatter) and
each shard is assembled from its key range alone (gather).

Every row gets a 16-byte blake2b of f"{seed}\\0{id}": its first 8 bytes decide the split
(val if below ``val_fraction * 2**64``), its last 8 bytes are its *key*. A split's rows in
key order (ties by id, then by input position: part, row) is the shuffle; shard k of a
split holds ranks [k * shard_rows, (k + 1) * shard_rows). Modalities mix because the key
ignores them.

1. inputs (driver): list the tokenized parts and read only their Parquet footers: row
   counts (for sizing) and each part's identity (name, size, footer bytes; tokenize writes
   into the footer a fingerprint of the part's input, tokenizers and params). Each split's
   64-bit key space is cut into ``RANGES_PER_SHARD`` x (estimated shards of the split)
   equal *key ranges* (range partitioning: range order = key order, so a shard is a run of
   consecutive ranges; hashing key mod N would scatter a shard's rank interval over every
   bucket).
2. scatter (one Ray task per *scatter unit*: consecutive parts of at most
   ``scatter_bytes`` decoded bytes together (their footers' uncompressed sizes), or one
   larger part; it holds its unit): hash
   the unit's ids, write its rows ordered by key range to
   ``<data_dir>/.scatter/<layout>/part-NNNNN.parquet`` (one row group per run of
   ``RANGES_PER_SHARD`` ranges) plus ``part-NNNNN.counts`` (rows per non-empty range). A
   file's content depends only on its unit and the layout, never on scheduling. The driver
   sums the counts: O(key ranges) = O(shards) numbers.
3. shard plan (driver): from the summed counts, each split's rows N_s give
   ceil(N_s / shard_rows) shards; shard k's rank interval maps to the key ranges it
   overlaps and an offset into the first one.
4. gather (one Ray task per shard): read those ranges' row groups from every scatter
   file, sort by (key, id) (stable, so exact duplicates keep part/row order: units are
   runs of consecutive parts), keep the shard's slice, write the Parquet shard atomically
   (temp + rename).

Shard sizes: exactly ``shard_rows`` rows, except the last shard of each split
(1..shard_rows rows), as a global sort would give. Memory: a scatter task holds one unit
(``scatter_bytes`` of decoded parts, or one part); a gather task holds the rows of the key ranges its
shard overlaps: a uniform hash puts about shard_rows / RANGES_PER_SHARD rows in each
range, so about shard_rows * (1 + 2 / RANGES_PER_SHARD) rows (many rows sharing one id
share one key and make one range larger). The driver holds O(parts + shards) state.
Cost: every gather opens every scatter file (one footer + the row groups it needs):
(decoded bytes / scatter_bytes) x shards opens, which is why scatter files are units of
many small parts rather than one per part (tokenize writes parts of ``rows_per_task``
rows: one per part made 10^6 opens of 1000-row-group files at 2M rows). The count still
grows as rows^2 / (scatter_bytes x shard_rows): at the paper's scale raise both
(RESULTS.md, growth).

Views: parts written with ``tokenize.views_per_image`` K > 1 carry the view columns
(pipelines.common.schema) into the shards unchanged; every part must have the same K, and
the manifest records ``views_per_image`` and ``view_layout`` (both absent for K = 1).

Same inputs + params -> same layout, scatter files and ranks -> byte-identical shards and
manifest, whatever the number of tasks in flight. Resume: each finished shard is
recorded (path, rows, bytes, sha256) in ``manifest.partial.json`` with a fingerprint of
the parts' identities, the tokenizers and the params; a rerun keeps every shard whose file
still has the recorded sha256, reuses finished scatter files, and writes only the rest.
``manifest.json`` is written last; ``.scatter`` is removed with it.

Modules: tasks.py (the scatter and gather Ray tasks), manifest.py (resume bookkeeping,
manifest.json); this module plans and drives them.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.common import storage
from pipelines.common.configs import check
from pipelines.common.ray_session import (
    RayConfig,
    bounded_tasks,
    cluster_cpus,
    ray_session,
    spread_task,
)
from pipelines.common.remote_outputs import StageOutput
from pipelines.common.schema import MODALITIES, TOKENIZERS, views_of
from pipelines.pack.manifest import (
    MANIFEST,
    PARTIAL,
    SPLITS,
    build_manifest,
    finished_shards,
    remove_stale,
    write_partial,
)
from pipelines.pack.tasks import RANGES_PER_SHARD, gather_shard, scatter_path, scatter_unit

SCATTER = ".scatter"


@dataclass(frozen=True)
class PackConfig(StageOutput):
    shard_rows: int = 2000
    val_fraction: float = 0.05
    seed: int = 0
    compression: Literal["zstd", "snappy", "lz4", "gzip", "none"] = "zstd"
    compression_level: int | None = None    # null: the codec's default
    row_group_rows: int = 500               # readers stream a shard row group by row group
    scatter_bytes: int = 64 * 2**20         # decoded bytes of consecutive parts one scatter task holds

    def __post_init__(self):
        super().__post_init__()
        check(self.shard_rows >= 1, "pack.shard_rows: must be >= 1")
        check(0.0 <= self.val_fraction < 1.0, "pack.val_fraction: must be in [0, 1)")
        check(self.row_group_rows >= 1, "pack.row_group_rows: must be >= 1")
        check(self.scatter_bytes >= 1, "pack.scatter_bytes: must be >= 1")


@dataclass(frozen=True)
class Inputs:
    """What the driver knows before reading any row: O(parts)."""
    parts: tuple[str, ...]
    units: tuple[tuple[str, ...], ...]  # scatter units: runs of consecutive parts (scatter_bytes)
    rows: int                    # from the footers
    ranges: tuple[int, int]      # key ranges of train, val (multiples of RANGES_PER_SHARD)
    fingerprint: str             # parts' identities + tokenizers + params
    scatter_dir: str             # this layout's scatter files
    views_per_image: int         # K of every part (tokenize.views_per_image; schema.shard_schema)


@dataclass(frozen=True)
class ShardSpec:
    split: str
    path: str       # relative to the data dir, e.g. train/shard-00000.parquet
    rows: int
    first: int      # global key ranges [first, last] hold the shard's rows ...
    last: int
    offset: int     # ... from this rank on, in (key, id) order


def pack_shards(cfg: PackConfig, tokenized_dir: str, ray_cfg: RayConfig) -> dict:
    """Shuffle every tokenized part into train/val shards + manifest.json; returns metrics."""
    start = time.time()
    parts = [p for m in MODALITIES for p in storage.list_files(storage.join(tokenized_dir, m), ".parquet")]
    if not parts:
        raise FileNotFoundError(f"{tokenized_dir}: no tokenized parts under text/, image/ or pair/")
    info_path = storage.join(tokenized_dir, TOKENIZERS)
    tokenizers = storage.read_json(info_path) if storage.exists(info_path) else {}
    inputs = plan_inputs(cfg, parts, tokenizers)
    split_shards, done = finished_shards(cfg.data_dir, inputs.fingerprint)
    write_partial(cfg.data_dir, inputs.fingerprint, split_shards, done)
    storage.remove(storage.join(cfg.data_dir, MANIFEST))
    remove_stale(cfg.data_dir, keep=set(done))
    written = scattered = 0
    if split_shards is None or len(done) < sum(split_shards.values()):
        with ray_session(ray_cfg) as ray:
            split_shards, written, scattered = _run(ray, cfg, ray_cfg, inputs, done)
    storage.remove(storage.join(cfg.data_dir, SCATTER))  # also a killed run's, when nothing was left to do
    manifest = build_manifest(cfg, inputs, tokenizers, shard_paths(split_shards), done)
    storage.write_json(storage.join(cfg.data_dir, MANIFEST), manifest)
    storage.remove(storage.join(cfg.data_dir, PARTIAL))
    seconds = time.time() - start
    shards = len(manifest["shards"])
    return {"rows": manifest["rows"], "rows_by_modality": manifest["rows_by_modality"],
            "splits": manifest["splits"], "shards": shards, "shards_written": written,
            "shards_reused": shards - written, "parts": len(parts), "parts_scattered": scattered,
            "scatter_files": len(inputs.units),
            "bytes": manifest["bytes"], "duplicate_ids": manifest["duplicate_ids"],
            "seconds": round(seconds, 2), "mb_per_s": round(manifest["bytes"] / 1e6 / max(seconds, 1e-9), 2)}


# ----------------------------------------------------------------------------- driver plan

def plan_inputs(cfg: PackConfig, parts: list[str], tokenizers: dict) -> Inputs:
    """Footers only: row counts, the fingerprint and the key-range layout (see the docstring)."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # object stores answer footers slowly
        infos = list(pool.map(_part_info, parts))
    views = {k: path for path, (_, _, k, _) in zip(parts, infos)}
    if len(views) > 1:
        raise ValueError(f"tokenized parts with different views_per_image: {views} (K: an example part); "
                         "rerun tokenize so that every part has the same K")
    rows = sum(info[0] for info in infos)
    params = cfg.content_params()
    del params["scatter_bytes"]  # only how the work is cut: the shards do not depend on it
    fp = hashlib.sha256(json.dumps([params, tokenizers], sort_keys=True).encode())
    for identity in (info[1] for info in infos):
        fp.update(identity.encode())
    units = scatter_units(parts, [info[3] for info in infos], cfg.scatter_bytes)
    estimates = (rows * (1.0 - cfg.val_fraction), rows * cfg.val_fraction)
    ranges = tuple(RANGES_PER_SHARD * max(1, min(-(-int(e) // cfg.shard_rows), 2**24)) for e in estimates)
    layout = hashlib.sha256(f"{fp.hexdigest()}\0{ranges}\0{cfg.scatter_bytes}".encode()).hexdigest()[:16]
    return Inputs(parts=tuple(parts), units=units, rows=rows, ranges=ranges, fingerprint=fp.hexdigest(),
                  scatter_dir=storage.join(cfg.data_dir, SCATTER, layout), views_per_image=next(iter(views)))


def scatter_units(parts: list[str], sizes: list[int], max_bytes: int) -> tuple[tuple[str, ...], ...]:
    """Runs of consecutive parts of at most ``max_bytes`` decoded bytes together (a larger
    part alone)."""
    units, unit, total = [], [], 0
    for path, size in zip(parts, sizes):
        if unit and total + size > max_bytes:
            units.append(tuple(unit))
            unit, total = [], 0
        unit.append(path)
        total += size
    return tuple(units + [tuple(unit)] if unit else units)


def _part_info(path: str) -> tuple[int, str, int, int]:
    """(rows, identity, views per image, decoded bytes) of a part from its footer: identity =
    name, size and the footer's bytes; decoded = its row groups' uncompressed size."""
    fs, p = storage.filesystem(path)
    with fs.open_input_file(p) as f:
        size = f.size()
        f.seek(size - 8)
        footer_len = int.from_bytes(f.read(4), "little")
        f.seek(size - 8 - footer_len)
        footer = f.read(footer_len)
        meta = pq.ParquetFile(f).metadata
        rows, views = meta.num_rows, views_of(meta.schema.to_arrow_schema(), path)
        decoded = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    rel = "/".join(path.rsplit("/", 2)[-2:])
    return rows, f"{rel}\0{size}\0{hashlib.sha256(footer).hexdigest()}\0", views, decoded


def shard_plan(cfg: PackConfig, inputs: Inputs, counts: np.ndarray) -> list[ShardSpec]:
    """Each split's shards from the rows per global key range (train ranges first)."""
    shards, base = [], 0
    for split, n_ranges in zip(SPLITS, inputs.ranges):
        cum = np.concatenate([[0], np.cumsum(counts[base:base + n_ranges])])
        total = int(cum[-1])
        for k in range(-(-total // cfg.shard_rows)):
            lo, hi = k * cfg.shard_rows, min((k + 1) * cfg.shard_rows, total)
            first, last = (int(np.searchsorted(cum, r, side="right")) - 1 for r in (lo, hi - 1))
            shards.append(ShardSpec(split, f"{split}/shard-{k:05d}.parquet", hi - lo, base + first,
                                    base + last, lo - int(cum[first])))
        base += n_ranges
    return shards


def shard_paths(split_shards: dict[str, int]) -> list[str]:
    return [f"{split}/shard-{k:05d}.parquet" for split in SPLITS for k in range(split_shards[split])]


def _run(ray, cfg: PackConfig, ray_cfg: RayConfig, inputs: Inputs, done: dict) -> tuple[dict, int, int]:
    """Scatter every part (reusing finished scatter files), then gather the unfinished shards."""
    limit, timeout = cluster_cpus(ray), ray_cfg.no_progress_timeout_s
    remote = functools.partial(spread_task, ray, num_cpus=ray_cfg.cpus_per_task)
    counts, scattered = _scatter_all(ray, remote, cfg, inputs, limit, timeout)
    shards = shard_plan(cfg, inputs, counts)
    split_shards = {split: sum(s.split == split for s in shards) for split in SPLITS}
    wanted = {s.path for s in shards}
    for rel in [rel for rel in done if rel not in wanted]:
        del done[rel]
    remove_stale(cfg.data_dir, keep=set(done))
    write_partial(cfg.data_dir, inputs.fingerprint, split_shards, done)
    options = (cfg.compression, cfg.compression_level, cfg.row_group_rows)
    jobs = {s: (inputs.scatter_dir, len(inputs.units), s.first, s.last, s.offset, s.rows,
                storage.join(cfg.data_dir, s.path), *options) for s in shards if s.path not in done}
    last_write = time.time()
    for n, (shard, entry) in enumerate(bounded_tasks(ray, remote(gather_shard), jobs, limit, timeout), start=1):
        done[shard.path] = {"split": shard.split, **entry}
        if time.time() - last_write > 1.0 or n == len(jobs):  # bounded manifest rewriting
            write_partial(cfg.data_dir, inputs.fingerprint, split_shards, done)
            last_write = time.time()
    return split_shards, len(jobs), scattered


def _scatter_all(ray, remote, cfg: PackConfig, inputs: Inputs, limit: int, timeout: float) -> tuple[np.ndarray, int]:
    """Rows per global key range, summed over scatter units as their tasks finish; and the
    number of parts scattered (not reused)."""
    base = storage.join(cfg.data_dir, SCATTER)
    for stale in _subdirs(base):
        if stale != inputs.scatter_dir:
            storage.remove(stale)
    counts = np.zeros(sum(inputs.ranges), np.int64)
    jobs = {}
    threshold = int(cfg.val_fraction * 2.0**64)
    for j, unit in enumerate(inputs.units):
        out = scatter_path(inputs.scatter_dir, j)
        if storage.exists(out + ".counts") and storage.exists(out):  # .counts is written last
            _add_counts(counts, storage.read_bytes(out + ".counts"))
        else:
            jobs[j] = (unit, out, cfg.seed, threshold, inputs.ranges, inputs.views_per_image)
    for _, sparse in bounded_tasks(ray, remote(scatter_unit), jobs, limit, timeout):
        _add_counts(counts, sparse)
    return counts, sum(len(job[0]) for job in jobs.values())


def _subdirs(path: str) -> list[str]:
    fs, p = storage.filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    return [storage.join(path, i.base_name) for i in fs.get_file_info(pafs.FileSelector(p))
            if i.type == pafs.FileType.Directory]


def _add_counts(counts: np.ndarray, sparse: bytes) -> None:
    """Add a part's (range, rows) pairs (int64 pairs, as scatter_part returns them)."""
    pairs = np.frombuffer(sparse, dtype="<i8").reshape(-1, 2)
    np.add.at(counts, pairs[:, 0], pairs[:, 1])
