"""clean stage per CPU core vs bare loops: images vs Pillow decode + verify + resize, texts vs the same filters.

    python -m benchmarks.clean_throughput [--images 1000 4000] [--image-size 96] [--photos 100]
                                          [--docs 2000] [--text-files 4] [--rounds 2]

Corpora, built once (not timed): ``--images`` demo scenes of ``--image-size`` px (one
corpus per count given: the stage's fixed costs, task start-up, dedup tasks, LSH setup,
weigh less in a larger one)
and ``--photos`` photo-sized 640x480 scenes (the stage resizes them to clean.image.max_side),
JPEG files in an image folder; ``--docs`` stdlib docstrings as JSONL in ``--text-files``
files (the stage reads one file per task). Each corpus is one source; the stage runs
``clean_sources`` with the default CleanConfig (every filter, exact and near dedup,
rejected rows, parts), in a Ray session started once.

Bare loops (one process, one thread, this process's thread CPU time):

- images, issue baseline: read file -> Image.open + verify() -> reopen + load -> EXIF
  transpose -> RGB -> resize to max_side -> encode as the stage stores images (PNG level
  clean.image.png_compress_level, zlib run-length strategy) -> one Parquet file. Without
  the encode the loop would produce nothing to store; its decode-only floor is printed too.
- images, bare with originals kept: the same, but a file that was RGB and needed no resize
  is stored as it came instead of PNG-encoded, as the stage does (keep_original): the
  like-for-like loop for the stage's pass-through (faster than the issue baseline).
- images, same steps: pipelines.clean.image_filters.IMAGE_STEPS in a plain loop (the stage's
  per-image work incl. phash and pixel hash, no Ray): what Ray and dedup add on top.
- texts: JSON decode -> pipelines.clean.text_filters.TEXT_STEPS -> text id -> MinHash ->
  exact + MinHash-LSH near dedup (datasketch) -> one Parquet file: the same filters.

Stage rates per core = units per CPU-second of the driver + its Ray workers (psutil,
benchmarks.data_common). The first run of each corpus is "cold": Ray starts its worker
processes and each imports pipelines, pyarrow, Pillow and scipy, as every stage
run does once. Idle workers are then kept (``KEEP_WORKERS``: Ray's defaults kill idle
workers above num_cpus after 1 s, so each phase would start new ones), and the
interleaved "warm" rounds give the cost per unit that a large corpus pays. Ray workers
run at nice 0 as under a Ray Job (see benchmarks.tokenize_throughput).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from benchmarks.common import print_table
from benchmarks.data_common import TreeMonitor, load_note, ratio, scene_images
from pipelines.clean import CleanConfig, clean_sources
from pipelines.clean.image_filters import IMAGE_STEPS, PNG_STRATEGY
from pipelines.clean.rejects import Reject, run_steps
from pipelines.clean.sources import SourceConfig
from pipelines.clean.text_filters import MINHASH_SCHEME, MINHASH_SEED, TEXT_STEPS, minhash, text_id
from pipelines.common.ray_session import RayConfig, ray_session
from pipelines.demo_data.text import stdlib_docs

RAY = RayConfig()
WORKER_NICENESS = {"RAY_worker_niceness": "0"}
KEEP_WORKERS = {"RAY_num_workers_soft_limit": "32", "RAY_idle_worker_killing_time_threshold_ms": "3600000"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, nargs="+", default=[1000, 4000, 16000],
                   help="demo-size scenes, one corpus per count (0: skip)")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--photos", type=int, default=1000, help="640x480 scenes (0: skip)")
    p.add_argument("--docs", type=int, default=2000, help="stdlib docstrings (0: skip; ~4.8k exist)")
    p.add_argument("--text-files", type=int, default=4, help="JSONL files the docs are split into")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tmp", default=None, help="work folder (default: a temporary one)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- inputs

def write_image_folder(folder: str, blobs: list[bytes]) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"img-{i:06d}.jpg") for i in range(len(blobs))]
    for path, data in zip(paths, blobs):
        with open(path, "wb") as f:
            f.write(data)
    return paths


def write_jsonl(folder: str, texts: list[str], files: int) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    step, paths = -(-len(texts) // files), []
    for k in range(files):
        path = os.path.join(folder, f"docs-{k:05d}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for i, text in enumerate(texts[k * step:(k + 1) * step]):
                f.write(json.dumps({"id": f"{k}-{i}", "text": text}) + "\n")
        paths.append(path)
    return paths


def build_cases(root: str, args) -> list[dict]:
    """Each case: its name, unit, source and input files."""
    cases = []
    image_sets = [(f"images-{n}", n, args.image_size, None) for n in args.images]
    image_sets.append(("photos", args.photos, 640, 480))
    for name, n, size, height in image_sets:
        if n:
            blobs = scene_images(n, size, "jpg", height=height)
            paths = write_image_folder(os.path.join(root, name), blobs)
            cases.append({"name": name, "unit": "images", "kind": "image", "format": "folder",
                          "n": n, "paths": paths, "size": f"{size}x{height or size} JPEG"})
    if args.docs:
        docs = [d.text for d in stdlib_docs()[0][:args.docs]]
        paths = write_jsonl(os.path.join(root, "texts"), docs, args.text_files)
        cases.append({"name": "texts", "unit": "docs", "kind": "text", "format": "jsonl", "n": len(docs),
                      "paths": paths, "size": f"{sum(map(len, docs)) / 1e6:.1f} MB in {args.text_files} files"})
    for case in cases:
        case["source"] = SourceConfig(case["name"], case["kind"], case["format"], os.path.join(root, case["name"]))
    return cases


# ----------------------------------------------------------------------------- bare loops

def _timed(fn) -> dict:
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    n = fn()
    return {"units": n, "cpu_s": time.thread_time() - cpu0, "wall_s": time.perf_counter() - wall0}


def bare_pillow(paths: list[str], cfg: CleanConfig, out: str, encode: bool, keep: bool = False) -> int:
    """read -> open + verify -> reopen + load -> EXIF transpose -> RGB -> resize (-> PNG -> Parquet);
    ``keep``: store the file's own bytes when it was RGB and not resized (as the stage does)."""
    icfg, stored = cfg.image, []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        im = Image.open(io.BytesIO(data))
        im.load()
        unchanged = im.mode == "RGB"
        im = ImageOps.exif_transpose(im).convert("RGB")
        if max(im.size) > icfg.max_side:
            scale, unchanged = icfg.max_side / max(im.size), False
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
        if encode and keep and unchanged:
            stored.append(data)
        elif encode:
            buf = io.BytesIO()
            im.save(buf, "PNG", compress_level=icfg.png_compress_level, compress_type=PNG_STRATEGY, optimize=False)
            stored.append(buf.getvalue())
    if encode:
        pq.write_table(pa.table({"image": stored}), out, compression="zstd")
    return len(paths)


def steps_loop(paths: list[str], cfg: CleanConfig, out: str) -> int:
    """The stage's own per-image steps (pipelines.clean.image_filters), no Ray, no dedup."""
    stored = []
    for path in paths:
        with open(path, "rb") as f:
            stored.append(run_steps(IMAGE_STEPS, f.read(), cfg.image).data)
    pq.write_table(pa.table({"image": stored}), out, compression="zstd")
    return len(paths)


def bare_text(paths: list[str], cfg: CleanConfig, out: str) -> int:
    """JSON -> the same text filters -> id -> MinHash -> exact + LSH near dedup -> Parquet."""
    from datasketch import LeanMinHash, MinHashLSH

    tcfg, n = cfg.text, 0
    lsh = MinHashLSH(threshold=tcfg.near_dedup_threshold, num_perm=tcfg.minhash_perms)
    seen, sigs, kept = set(), [], []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                n += 1
                try:
                    text = run_steps(TEXT_STEPS, json.loads(line)["text"], tcfg)
                except Reject:
                    continue
                doc_id = text_id(text)
                if doc_id in seen:
                    continue
                seen.add(doc_id)
                sig = minhash(text, tcfg.minhash_perms, tcfg.minhash_ngram)
                lean = LeanMinHash(seed=MINHASH_SEED, hashvalues=sig, scheme=MINHASH_SCHEME)
                if any(np.mean(sig == sigs[j]) >= tcfg.near_dedup_threshold for j in lsh.query(lean)):
                    continue
                lsh.insert(len(sigs), lean, check_duplication=False)
                sigs.append(sig)
                kept.append((doc_id, text))
    pq.write_table(pa.table({"id": [k for k, _ in kept], "text": [t for _, t in kept]}), out, compression="zstd")
    return n


# ----------------------------------------------------------------------------- stage runs

def stage_run(source: SourceConfig, cfg: CleanConfig) -> dict:
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    with TreeMonitor() as mon:
        metrics = clean_sources([source], cfg, RAY)
    u = mon.usage
    return {"units": metrics["rows_in"], "kept": metrics["kept"], "wall_s": u.wall_s, "cpu_work_s": u.cpu_work,
            "cpu_tree_s": u.cpu_total, "cpu_s": dict(u.cpu_s), "workers": len(u.worker_cpu_s)}


def case_jobs(case: dict, root: str) -> dict:
    cfg = CleanConfig(out_dir=os.path.join(root, "out", case["name"]))
    bare_out = os.path.join(root, "bare.parquet")
    jobs = {"stage": lambda: stage_run(case["source"], cfg)}
    if case["unit"] == "images":
        jobs["bare"] = lambda: _timed(lambda: bare_pillow(case["paths"], cfg, bare_out, encode=True))
        jobs["decode_only"] = lambda: _timed(lambda: bare_pillow(case["paths"], cfg, bare_out, encode=False))
        jobs["bare_keep"] = lambda: _timed(lambda: bare_pillow(case["paths"], cfg, bare_out, encode=True, keep=True))
        jobs["steps_loop"] = lambda: _timed(lambda: steps_loop(case["paths"], cfg, bare_out))
    else:
        jobs["bare"] = lambda: _timed(lambda: bare_text(case["paths"], cfg, bare_out))
    return jobs


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = args.tmp or tempfile.mkdtemp(prefix="bench-clean-")
    for key, value in {**WORKER_NICENESS, **KEEP_WORKERS}.items():
        os.environ.setdefault(key, value)
    loads, results = [], {}
    try:
        with ray_session(RAY):
            cases = build_cases(root, args)
            jobs = {(c["name"], run): fn for c in cases for run, fn in case_jobs(c, root).items()}
            runs = {key: [] for key in jobs}
            for c in cases:  # cold: the first run starts the worker processes (kept from now on)
                runs[(c["name"], "cold")] = [jobs[(c["name"], "stage")]()]
            for r in range(args.rounds):
                for key in (list(jobs) if r % 2 == 0 else list(reversed(jobs))):
                    loads.append(os.getloadavg()[0])
                    runs[key].append(jobs[key]())
            for c in cases:
                results[c["name"]] = summarize(c, {run: v for (name, run), v in runs.items() if name == c["name"]})
    finally:
        if not args.tmp:
            shutil.rmtree(root, ignore_errors=True)
    result = {"cases": results, "rounds": args.rounds, "cores": os.cpu_count(),
              "load_avg": round(statistics.mean(loads), 1) if loads else None}
    print_report(result)
    return result


def summarize(case: dict, runs: dict) -> dict:
    med = lambda run, key: statistics.median(r[key] for r in runs[run])  # noqa: E731
    n = case["n"]
    bare = ratio(n, med("bare", "cpu_s"))
    stage = ratio(n, med("stage", "cpu_work_s"))
    cold = runs["cold"][0]
    out = {"unit": case["unit"], "n": n, "size": case["size"], "kept": runs["stage"][0]["kept"],
           "bare_per_cpu_s": bare, "stage_per_cpu_s": stage, "cold_per_cpu_s": n / cold["cpu_work_s"],
           "stage_per_tree_cpu_s": ratio(n, med("stage", "cpu_tree_s")),
           "cold_extra_cpu_s": cold["cpu_work_s"] - med("stage", "cpu_work_s"),
           "cold_workers": cold["workers"], "warm_workers": max(r["workers"] for r in runs["stage"]),
           "ratio_per_core_cpu": stage / bare, "ratio_per_core_cold": n / cold["cpu_work_s"] / bare,
           "stage_wall_s": med("stage", "wall_s"), "bare_wall_s": med("bare", "wall_s"),
           "cpu_s_by_role": {k: round(statistics.median(r["cpu_s"][k] for r in runs["stage"]), 2)
                             for k in runs["stage"][0]["cpu_s"]},
           "runs": runs}
    for extra in ("decode_only", "bare_keep", "steps_loop"):
        if extra in runs:
            out[f"{extra}_per_cpu_s"] = ratio(n, med(extra, "cpu_s"))
    if "steps_loop" in runs:
        out["ratio_vs_steps_loop"] = stage / out["steps_loop_per_cpu_s"]
    return out


def _ms(per_cpu_s: float) -> str:
    return f"{1000 / per_cpu_s:.2f}"


def print_report(result: dict) -> None:
    print(f"clean: {result['rounds']} rounds, interleaved; {load_note()} (mean at run starts {result['load_avg']})")
    rows = []
    for name, c in result["cases"].items():
        unit = c["unit"]
        rows.append([f"{name}: bare loop", f"{c['bare_per_cpu_s']:.0f}", _ms(c['bare_per_cpu_s']), "1.00x", c["size"]])
        for extra, label in (("decode_only", "decode floor (no encode)"), ("bare_keep", "bare, originals kept"),
                             ("steps_loop", "stage steps, no Ray")):
            if f"{extra}_per_cpu_s" in c:
                rate = c[f"{extra}_per_cpu_s"]
                rows.append([f"{name}: {label}", f"{rate:.0f}", _ms(rate), f"{rate / c['bare_per_cpu_s']:.2f}x", ""])
        rows.append([f"{name}: stage, warm workers", f"{c['stage_per_cpu_s']:.0f}", _ms(c['stage_per_cpu_s']),
                     f"{c['ratio_per_core_cpu']:.2f}x",
                     f"{c['n']} {unit} in, {c['kept']} kept, <= {c['warm_workers']} workers"])
        rows.append([f"{name}: stage, cold (1st run)", f"{c['cold_per_cpu_s']:.0f}", _ms(c['cold_per_cpu_s']),
                     f"{c['ratio_per_core_cold']:.2f}x",
                     f"+{c['cold_extra_cpu_s']:.1f} CPU-s, {c['cold_workers']} workers"])
    print_table(["run", "units/CPU-s", "CPU ms/unit", "vs bare", "note"], rows)
    for name, c in result["cases"].items():
        target = " (target >= 0.8x)" if c["unit"] == "images" else ""
        keep = f" ({c['stage_per_cpu_s'] / c['bare_keep_per_cpu_s']:.2f}x of bare with originals kept)" if "bare_keep_per_cpu_s" in c else ""
        print(f"{name}: per core {c['ratio_per_core_cpu']:.2f}x warm{target}{keep}, {c['ratio_per_core_cold']:.2f}x cold; "
              f"wall s: stage {c['stage_wall_s']:.1f}, bare {c['bare_wall_s']:.1f}; "
              f"CPU s by role {c['cpu_s_by_role']}")


if __name__ == "__main__":
    main()
