"""Per-worker input pipeline throughput (issue 16): can the loader keep a GPU fed?

    python -m benchmarks.loader                      # base geometry, ~1-2 minutes on 2 cores
    python -m benchmarks.loader --workers 1,2,4 --batch 96 --steps 16
    python -m benchmarks.loader --quick              # tiny images and batches: a smoke run

What one training worker does for every step, without the model: read its rows from the
shards (pipelines.common.shards), decode the PNG views into (3, 224, 224) float tensors and
pad the texts (model.batch.collate_rows), draw the text and block masks
(pipelines.pretrain.data.step_masks) - i.e. pipelines.pretrain.loader.StepSource - built
by the loader ``pretrain.loader_workers`` selects: 1 = one background thread, k > 1 = k
processes. A "k threads" row (a thread pool over the same steps, not offered by the config)
shows what the GIL leaves of more threads.

The shards are synthetic at the base preset's geometry, written to a temp folder: 224 px
PNG views of smooth multi-octave noise (photo-like in PNG size; encoded like the tokenize
stage's), 196 visual tokens each, pair captions of 32-64 tokens and texts of 192-256
tokens from a 64010-word vocabulary. Batches: pair only, image only, and mixed (thirds).

Figures per loader: wall samples/s, and samples per CPU-second of every process involved
(training process + loader processes). The development machine is shared and its
scheduler gives one session one fair slice (benchmarks/data_common.py), so the CPU form is
the robust "samples/s per core"; cores per GPU = the GPU's samples/s over it.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import torch
from PIL import Image

from benchmarks.common import print_table
from benchmarks.data_common import load_note, ratio
from model.task import Masker, MaskingConfig
from pipelines.common import storage
from pipelines.common.schema import MODALITIES, shard_table
from pipelines.common.shards import ShardIndex
from pipelines.pretrain.loader import StepSource, step_loader
from pipelines.tokenize import PNG_STRATEGY

# DESIGN §7: BEiT-3 base on one H200, pair batch of 256 (197 image + 64 text tokens)
GPU_RATES = {"H200 eager": 1428, "H200 compiled": 1981}
VOCAB, SPECIAL_IDS, VISUAL_CODES = 64010, (0, 1, 2, 3), 8192
BOS, PAD, EOS = 0, 1, 2
CAPTION_TOKENS, TEXT_TOKENS = (32, 64), (192, 256)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=224, help="view side in pixels (base: 224)")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--batch", type=int, default=48, help="samples per step of this worker (mixed: thirds)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per row (after the warm-up steps)")
    p.add_argument("--rows", type=int, default=240, help="rows per modality in the shard set")
    p.add_argument("--shard-rows", type=int, default=120, help="rows per shard (all modalities mixed)")
    p.add_argument("--base-images", type=int, default=8,
                   help="distinct noise images; every row holds its own random shift of one (unique bytes)")
    p.add_argument("--workers", default=None,
                   help="loader_workers values, comma-separated (default: 1, 2, 4, 8 up to the core count)")
    p.add_argument("--mixes", default="pair,image,mixed")
    p.add_argument("--no-threads", action="store_true", help="skip the 'k threads' reference rows")
    p.add_argument("--world-size", type=int, default=1,
                   help="act as rank 0 of this many training workers (image masks are drawn per global batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="32 px, batch 6, 2 steps, 1 and 2 workers (smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.batch, args.steps, args.rows, args.shard_rows, args.base_images = 32, 6, 2, 24, 12, 2
        args.workers = args.workers or "1,2"
    cores = os.cpu_count() or 1
    args.workers = args.workers or ",".join(str(k) for k in (1, 2, 4, 8) if k == 1 or k <= cores)
    return args


# ----------------------------------------------------------------------------- synthetic shards

def natural_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8: noise summed over octaves, coarse to fine (1/f-like, so PNG
    compresses it about as well as a photo)."""
    x = np.zeros((size, size, 3), np.float32)
    for cells, amplitude in ((4, 1.0), (8, 0.6), (16, 0.4), (32, 0.25), (64, 0.15), (size, 0.08)):
        small = (rng.standard_normal((cells, cells, 3)) * 40 + 128).clip(0, 255).astype(np.uint8)
        x += amplitude * (np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), np.float32) - 128)
    return (x + 128).clip(0, 255).astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=6, compress_type=PNG_STRATEGY,
                                        optimize=False)
    return buf.getvalue()


def token_ids(rng: random.Random, lengths: tuple[int, int]) -> list[int]:
    """<s> words </s> of a length drawn uniformly from ``lengths``."""
    n = rng.randint(*lengths)
    return [BOS] + [rng.randrange(len(SPECIAL_IDS), VOCAB - 1) for _ in range(n - 2)] + [EOS]


def synthetic_shards(root: str, args) -> tuple[ShardIndex, float]:
    """Mixed-modality shards of ``args.rows`` rows per modality -> (index, mean PNG KB)."""
    rng, nrng = random.Random(args.seed), np.random.default_rng(args.seed)
    bases = [natural_image(nrng, args.image_size) for _ in range(args.base_images)]
    tokens = (args.image_size // args.patch) ** 2
    rows = []
    for m in MODALITIES:
        for i in range(args.rows):
            row = {"id": f"{m}-{i:06d}", "modality": m, "text_ids": None, "image": None,
                   "visual_tokens": None, "source": "benchmark"}
            if m != "text":
                # unique bytes per row: Parquet would store repeated images once and make reads look cheap
                shift = (rng.randrange(args.image_size), rng.randrange(args.image_size))
                row["image"] = png(np.roll(bases[rng.randrange(len(bases))], shift, axis=(0, 1)))
                row["visual_tokens"] = [rng.randrange(VISUAL_CODES) for _ in range(tokens)]
            if m != "image":
                row["text_ids"] = token_ids(rng, TEXT_TOKENS if m == "text" else CAPTION_TOKENS)
            rows.append(row)
    rng.shuffle(rows)
    paths, counts = [], {m: [] for m in MODALITIES}
    for start in range(0, len(rows), args.shard_rows):
        chunk = rows[start:start + args.shard_rows]
        path = os.path.join(root, f"shard-{len(paths):05d}.parquet")
        storage.write_parquet(shard_table({k: [r[k] for r in chunk] for k in chunk[0]}), path)
        paths.append(path)
        for m in MODALITIES:
            counts[m].append(sum(r["modality"] == m for r in chunk))
    kb = np.mean([len(r["image"]) for r in rows if r["image"]]) / 1e3
    return ShardIndex(tuple(paths), {m: tuple(c) for m, c in counts.items()}), kb


def mix_batches(batch: int) -> dict[str, dict[str, int]]:
    third = max(1, batch // 3)
    return {"pair": {"pair": batch}, "image": {"image": batch},
            "mixed": {"text": third, "image": third, "pair": third}}


# ----------------------------------------------------------------------------- timing

class ThreadsLoader:
    """Reference only: ``k`` threads of one process build the steps ahead, in order."""

    def __init__(self, source: StepSource, k: int):
        self.source, self.k = source, k
        self.pool = ThreadPoolExecutor(max_workers=k)
        self.pending: dict[int, object] = {}

    def get(self, step: int, last_step: int):
        for ahead in range(step, min(step + 2 * self.k, last_step)):
            if ahead not in self.pending:
                self.pending[ahead] = self.pool.submit(self.source.__getitem__, ahead)
        return self.pending.pop(step).result()

    def worker_pids(self) -> list[int]:
        return []

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of this process (all its threads) and of ``pids``."""
    total = time.process_time()
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def measure(source: StepSource, kind: str, k: int, warmup: int, steps: int) -> dict:
    """Wall and CPU time of ``steps`` steps after ``warmup`` ones (process start, the first
    shard reads and the initial prefetch fill stay out of the timing)."""
    loader = ThreadsLoader(source, k) if kind == "threads" else step_loader(source, k)
    last = warmup + steps
    try:
        for step in range(warmup):
            loader.get(step, last)
        pids = loader.worker_pids() if kind == "processes" else []
        cpu0, wall0 = cpu_seconds(pids), time.perf_counter()
        samples = 0
        for step in range(warmup, last):
            samples += loader.get(step, last)[0].num_samples
        wall, cpu = time.perf_counter() - wall0, cpu_seconds(pids) - cpu0
    finally:
        loader.close()
    return {"samples": samples, "wall_s": wall, "cpu_s": cpu, "samples_per_s": samples / wall,
            "samples_per_cpu_s": ratio(samples, cpu)}


def loaders(workers: list[int], threads: bool) -> list[tuple[str, int]]:
    out = []
    for k in workers:
        out.append(("thread" if k == 1 else "processes", k))
        if k > 1 and threads:
            out.append(("threads", k))
    return out


def main(argv=None) -> dict:
    """Build the shards, time every (mix, loader), print the table, return the figures."""
    started = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(1)  # as in a loader process (DataLoader workers run one thread)
    workers = [int(w) for w in args.workers.split(",")]
    masker = Masker(MaskingConfig(), VOCAB, SPECIAL_IDS, VOCAB - 1, args.patch)
    results = []
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as root:
        index, png_kb = synthetic_shards(root, args)
        print(f"{len(index.paths)} shards, {args.rows} rows per modality, {args.image_size} px PNG views "
              f"(mean {png_kb:.0f} KB), batch {args.batch} per step, world size {args.world_size}; {load_note()}")
        for mix in args.mixes.split(","):
            local = mix_batches(args.batch)[mix]
            glob = {m: n * args.world_size for m, n in local.items()}
            for kind, k in loaders(workers, not args.no_threads):
                source = StepSource(index, glob, args.seed, 0, args.world_size, masker, PAD, log_samples=False)
                figures = measure(source, kind, k, warmup=2 * k + 1, steps=args.steps)
                results.append({"mix": mix, "loader": f"{k} {kind}", "loader_workers": k, "kind": kind, **figures})
    summary = _report(results)
    summary.update(results=results, png_kb=png_kb, load=load_note(), seconds=time.perf_counter() - started,
                   rows=[{"mix": r["mix"], "workers": r["loader"], "samples_per_s": r["samples_per_s"],
                          "per_core": r["samples_per_cpu_s"]} for r in results])  # benchmarks.gpu_suite's table
    print(f"total {summary['seconds']:.0f} s; {load_note()}")
    return summary


def _report(results: list[dict]) -> dict:
    header = ["batch", "loader", "samples/s", "CPU s", "samples/CPU-s",
              *[f"cores/GPU {name} ({rate}/s)" for name, rate in GPU_RATES.items()]]
    rows = []
    for r in results:
        r["cores_per_gpu"] = {name: rate / r["samples_per_cpu_s"] for name, rate in GPU_RATES.items()}
        rows.append([r["mix"], r["loader"], f"{r['samples_per_s']:.0f}", f"{r['cpu_s']:.2f}",
                     f"{r['samples_per_cpu_s']:.0f}", *[f"{c:.1f}" for c in r["cores_per_gpu"].values()]])
    print_table(header, rows)
    needed = {}
    for mix in dict.fromkeys(r["mix"] for r in results):
        # the multi-process figure when there is one: that is how several cores feed a worker
        best = [r for r in results if r["mix"] == mix and r["kind"] != "threads"][-1]
        needed[mix] = {name: math.ceil(c) for name, c in best["cores_per_gpu"].items()}
        print(f"{mix}: {best['loader']} -> {best['samples_per_cpu_s']:.0f} samples per CPU-second: "
              + ", ".join(f"{n} loader cores per GPU at {name} ({GPU_RATES[name]} samples/s)"
                          for name, n in needed[mix].items()))
    return {"cores_per_gpu": needed}


if __name__ == "__main__":
    main()
