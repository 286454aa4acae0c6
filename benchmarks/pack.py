"""pack throughput vs a bare pyarrow pack loop over the same parts (target: >= 0.7x).

    python -m benchmarks.pack [--rows 9000] [--image-size 96] [--shard-rows 2000] [--rounds 5]

Builds a tokenized corpus (equal thirds text / image / pair, PNG views with noise so they
do not compress away) in ``--parts`` parts per modality, starts Ray once (workers at nice 0,
as under a Ray Job; not timed), runs ``pack_shards`` once cold (Ray starts its worker
processes; reported, not in the ratio), then times, interleaved (ours, bare, bare, ours,
...: the order flips every round), each figure the median:

- pack: ``pack_shards`` end to end into a fresh folder: footers only on the driver,
  scatter each part by key range, gather each shard (its key ranges, sorted), write it (Parquet, ``pack.compression``, row groups
  of ``pack.row_group_rows``) atomically with fsync, sha256 per shard, manifest.
- bare: what a user would run instead, in this process: ``pq.read_table`` every part,
  concatenate, shuffle (one ``take`` of a seeded permutation), split off ``val_fraction``,
  ``pq.write_table`` each split in shards of ``--shard-rows`` rows with the same
  compression and row groups. Same input, same output bytes per row; no fsync, no hashes,
  no resume record (our extras, paid by ours).
- write only: ``pq.write_table`` of the already-shuffled in-memory table to one file (the
  floor any packer pays for writing the bytes; a reference line, not the target).

Rates are MB of in-memory Arrow data per second of wall-clock; the ratio is pack / bare,
both the ratio of the medians and the median of the per-round ratios (rounds are paired).
CPU time (driver + Ray workers for pack, this process for bare; benchmarks.data_common) is
printed too: on this shared machine it is the load-proof figure.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import statistics
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from benchmarks.common import print_table
from benchmarks.data_common import TreeMonitor, load_note, ratio
from pipelines.common import storage
from pipelines.common.ray_session import RayConfig, ray_session
from pipelines.common.schema import SHARD_SCHEMA, shard_table
from pipelines.pack import PackConfig, pack_shards

RAY = RayConfig()
WORKER_NICENESS = {"RAY_worker_niceness": "0"}  # as under a Ray Job; set before Ray starts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=9000)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--shard-rows", type=int, default=PackConfig.shard_rows, help="pack.shard_rows (params default)")
    p.add_argument("--parts", type=int, default=4, help="tokenized parts per modality")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tmp", default=None, help="work folder (default: a temporary one)")
    return p.parse_args(argv)


def noisy_png(rng: np.random.Generator, size: int) -> bytes:
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) // 8 * 8  # noise, partly compressible
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def make_tokenized(root: str, rows: int, image_size: int, parts_per_kind: int) -> pa.Table:
    """Write tokenized parts under ``root``; return all rows as one table."""
    rng, pyrng = np.random.default_rng(0), random.Random(0)
    grid = (image_size // 16) ** 2
    tables = []
    for kind in ("text", "image", "pair"):
        n = rows // 3
        has_text, has_image = kind != "image", kind != "text"
        cols = {
            "id": [f"{kind}-{i:08d}" for i in range(n)], "modality": [kind] * n,
            "text_ids": [[0, *rng.integers(5, 64000, pyrng.randrange(8, 254)).tolist(), 2] if has_text else None
                         for _ in range(n)],
            "image": [noisy_png(rng, image_size) if has_image else None for _ in range(n)],
            "visual_tokens": [rng.integers(0, 8192, grid).tolist() if has_image else None for _ in range(n)],
            "source": [f"bench_{kind}"] * n,
        }
        table = shard_table(cols)
        step = -(-n // parts_per_kind)
        for p in range(parts_per_kind):
            storage.write_parquet(table.slice(p * step, step), os.path.join(root, kind, f"part-{p:05d}.parquet"))
        tables.append(table)
    return pa.concat_tables(tables).combine_chunks()


# ----------------------------------------------------------------------------- timed runs

def bare_pack(parts: list[str], out: str, cfg: PackConfig) -> int:
    """Read every part, shuffle, split, write shards: the loop a user would write."""
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    table = table.take(np.random.default_rng(cfg.seed).permutation(table.num_rows))
    n_val = round(cfg.val_fraction * table.num_rows)
    for split, rows in (("val", table.slice(0, n_val)), ("train", table.slice(n_val))):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        for k, start in enumerate(range(0, rows.num_rows, cfg.shard_rows)):
            pq.write_table(rows.slice(start, cfg.shard_rows), os.path.join(out, split, f"shard-{k:05d}.parquet"),
                           compression=cfg.compression, compression_level=cfg.compression_level,
                           row_group_size=cfg.row_group_rows)
    return table.num_rows


def write_only(table: pa.Table, out: str, cfg: PackConfig) -> int:
    pq.write_table(table, out, compression=cfg.compression, compression_level=cfg.compression_level,
                   row_group_size=cfg.row_group_rows)
    return table.num_rows


def timed(fn, out: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    if os.path.exists(out):
        os.remove(out)
    with TreeMonitor() as mon:
        rows = fn()
    u = mon.usage
    return {"rows": rows, "wall_s": u.wall_s, "cpu_s": u.cpu_work, "cpu_by_role": dict(u.cpu_s)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = args.tmp or tempfile.mkdtemp(prefix="bench-pack-")
    for key, value in WORKER_NICENESS.items():
        os.environ.setdefault(key, value)
    loads = []
    try:
        with ray_session(RAY):
            tokenized = os.path.join(root, "tokenized")
            table = make_tokenized(tokenized, args.rows, args.image_size, args.parts)
            assert table.schema.equals(SHARD_SCHEMA)
            parts = sorted(storage.list_files(tokenized, ".parquet"))
            cfg = PackConfig(out_dir=os.path.join(root, "shards"), shard_rows=args.shard_rows)
            shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
            jobs = {
                "pack": lambda: timed(lambda: pack_shards(cfg, tokenized, RAY)["rows"], cfg.out_dir),
                "bare": lambda: timed(lambda: bare_pack(parts, os.path.join(root, "bare"), cfg),
                                      os.path.join(root, "bare")),
                "write_only": lambda: timed(lambda: write_only(shuffled, os.path.join(root, "one.parquet"), cfg),
                                            os.path.join(root, "one.parquet")),
            }
            runs = {name: [] for name in jobs}
            runs["cold"] = [jobs["pack"]()]  # Ray starts the worker processes
            for r in range(args.rounds):
                for name in (list(jobs) if r % 2 == 0 else list(reversed(jobs))):
                    loads.append(os.getloadavg()[0])
                    runs[name].append(jobs[name]())
            shards = len(storage.list_files(cfg.out_dir, ".parquet"))
    finally:
        if not args.tmp:
            shutil.rmtree(root, ignore_errors=True)
    return report(args, table, shards, runs, loads)


def report(args, table: pa.Table, shards: int, runs: dict, loads: list[float]) -> dict:
    mb = table.nbytes / 1e6
    med = lambda name, key: statistics.median(r[key] for r in runs[name])
    paired = statistics.median(b["wall_s"] / p["wall_s"] for p, b in zip(runs["pack"], runs["bare"]))
    result = {
        "rows": table.num_rows, "mb": mb, "shards": shards, "image_size": args.image_size, "rounds": args.rounds,
        "cores": os.cpu_count(), "load_avg": round(statistics.mean(loads), 1) if loads else None,
        "pack_mb_per_s": mb / med("pack", "wall_s"), "bare_mb_per_s": mb / med("bare", "wall_s"),
        "write_only_mb_per_s": mb / med("write_only", "wall_s"), "cold_mb_per_s": mb / runs["cold"][0]["wall_s"],
        "ratio": med("bare", "wall_s") / med("pack", "wall_s"), "ratio_paired": paired,
        "ratio_vs_write_only": med("write_only", "wall_s") / med("pack", "wall_s"),
        "ratio_cpu": ratio(med("bare", "cpu_s"), med("pack", "cpu_s")),
        "pack_cpu_by_role": {k: round(statistics.median(r["cpu_by_role"][k] for r in runs["pack"]), 2)
                             for k in runs["pack"][0]["cpu_by_role"]},
        "runs": runs,
    }
    print(f"pack: {table.num_rows} rows, {mb:.1f} MB in memory, {shards} shards of {args.shard_rows} rows, "
          f"image {args.image_size} px, {args.rounds} rounds interleaved; {load_note()} "
          f"(mean at run starts {result['load_avg']})")
    rows = []
    for name, label in (("bare", "bare pack loop (read, shuffle, write shards)"), ("pack", "pack_shards, warm"),
                        ("cold", "pack_shards, cold (1st run)"), ("write_only", "write only (one pq.write_table)")):
        wall, cpu = med(name, "wall_s"), med(name, "cpu_s")
        rows.append([label, f"{mb / wall:.1f}", f"{med('bare', 'wall_s') / wall:.2f}x", f"{wall:.2f}",
                     f"{ratio(mb, cpu):.1f}"])
    print_table(["run", "MB/s", "vs bare", "wall s", "MB/CPU-s"], rows)
    print(f"ratio pack / bare: {result['ratio']:.2f}x (medians), {paired:.2f}x (median of paired rounds), "
          f"CPU {result['ratio_cpu']:.2f}x (target >= 0.7x); vs write only {result['ratio_vs_write_only']:.2f}x")
    print(f"pack CPU s by role: {result['pack_cpu_by_role']}")
    return result


if __name__ == "__main__":
    main()
