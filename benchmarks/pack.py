"""pack throughput vs a bare pyarrow write of the same rows (target: >= 0.7x).

    python -m benchmarks.pack [--rows 9000] [--image-size 96] [--shard-rows 1000]

Builds a tokenized corpus (equal thirds text / image / pair, PNG views with
noise so they do not compress away), starts Ray once (not timed), then times,
side by side in one run:

- bare: read nothing, ``pq.write_table`` the already-concatenated table (zstd)
  to one file; the floor any packer pays for writing the bytes.
- pack: ``pack_shards`` end to end (plan from ids, scatter, gather, sha256,
  fsync, manifest), reading the tokenized parts from disk; once cold (Ray
  starts its worker processes) and once warm (the ratio uses the warm run).

Both rates are MB of in-memory Arrow data per second; the ratio is pack / bare.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines import storage
from pipelines.pack import PackConfig, pack_shards
from pipelines.ray_session import RayConfig, ray_session
from pipelines.schema import SHARD_SCHEMA, shard_table


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=9000)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--shard-rows", type=int, default=1000)
    parser.add_argument("--parts", type=int, default=4, help="tokenized parts per modality")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ray_session(RayConfig()):
        table = make_tokenized(os.path.join(tmp, "tokenized"), args.rows, args.image_size, args.parts)
        assert table.schema.equals(SHARD_SCHEMA)
        mb = table.nbytes / 1e6

        start = time.perf_counter()
        pq.write_table(table, os.path.join(tmp, "bare.parquet"), compression="zstd", row_group_size=500)
        bare = time.perf_counter() - start

        times = []
        for run in ("cold", "warm"):  # cold: Ray starts its worker processes; warm: they exist
            cfg = PackConfig(out_dir=os.path.join(tmp, f"shards-{run}"), shard_rows=args.shard_rows)
            start = time.perf_counter()
            metrics = pack_shards(cfg, os.path.join(tmp, "tokenized"), RayConfig())
            times.append(time.perf_counter() - start)
        cold, packed = times

    print(f"rows {table.num_rows}, {mb:.1f} MB in memory, {metrics['shards']} shards, "
          f"image {args.image_size}px, {os.cpu_count()} cores")
    print(f"bare pyarrow write : {mb / bare:8.1f} MB/s  ({bare:.2f} s)")
    print(f"pack_shards (cold) : {mb / cold:8.1f} MB/s  ({cold:.2f} s)")
    print(f"pack_shards (warm) : {mb / packed:8.1f} MB/s  ({packed:.2f} s)")
    print(f"ratio pack / bare  : {bare / packed:.2f}x  (target >= 0.7x)")


if __name__ == "__main__":
    main()
