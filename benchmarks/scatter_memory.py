"""Peak memory of one pack scatter task on a unit of short text rows, like growth's 100x.

    python -m benchmarks.scatter_memory [--parts 260] [--rows-per-part 2048] [--ranges 100,5]

Writes synthetic tokenized parts (tokenize's 2048-row units of 12-28-token texts), plans the
first scatter unit as pack does (pack.scatter_bytes of decoded bytes) and runs
pipelines.pack.tasks.scatter_unit on it in a fresh process, reporting the process's peak RSS above
its RSS just before the call (libraries imported). RESULTS.md, "Growth to 100x", has figures.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile

import pyarrow.parquet as pq

from pipelines.common.schema import shard_table

MEASURE = """
import json, resource, sys
import pyarrow.parquet  # noqa: F401  (loaded before the baseline, as in a warm Ray worker)
from pipelines.pack import tasks
paths, out, ranges = json.loads(sys.argv[1])
tasks.scatter_unit(tuple(paths[:1]), out + ".warm", 0, 2**60, tuple(ranges))  # first-use allocations
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tasks.scatter_unit(tuple(paths), out, 0, 2**60, tuple(ranges))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_mib": base / 1024, "peak_mib": peak / 1024}))
"""


def write_text_parts(folder: str, parts: int, rows: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    paths = []
    for p in range(parts):
        ids = [hashlib.sha256(f"{p}-{i}".encode()).hexdigest() for i in range(rows)]
        table = shard_table({"id": ids, "modality": ["text"] * rows, "image": [None] * rows,
                             "visual_tokens": [None] * rows, "source": ["rows"] * rows,
                             "text_ids": [[0, *(rng.randrange(5, 2000) for _ in range(rng.randint(12, 28))), 2]
                                          for _ in range(rows)]})
        paths.append(os.path.join(folder, f"part-00000-{p:05d}.parquet"))
        pq.write_table(table, paths[-1], compression="zstd")
    return paths


def measure(paths: list[str], out: str, ranges: tuple[int, int], scatter_bytes: int) -> dict:
    from pipelines.pack import _part_info, scatter_units

    infos = [_part_info(p) for p in paths]
    unit = scatter_units(paths, [i[3] for i in infos], scatter_bytes)[0]
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps([list(unit), out, list(ranges)])],
                          capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    chosen = infos[:len(unit)]
    return {"parts": len(unit), "rows": sum(i[0] for i in chosen),
            "decoded_mib": round(sum(i[3] for i in chosen) / 2**20, 3),
            "peak_above_base_mib": round(result["peak_mib"] - result["base_mib"], 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=260)
    parser.add_argument("--rows-per-part", type=int, default=2048)
    parser.add_argument("--ranges", default="100,5", help="train,val key ranges (8 per shard)")
    parser.add_argument("--scatter-bytes", type=int, default=64 * 2**20)
    args = parser.parse_args(argv)
    ranges = tuple(int(r) for r in args.ranges.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_text_parts(tmp, args.parts, args.rows_per_part)
        result = measure(paths, os.path.join(tmp, "scatter.parquet"), ranges, args.scatter_bytes)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
