"""Growth of clean + tokenize + pack with the corpus: time (linear?) and peak memory (bounded?).

    python -m benchmarks.growth [--scales 1,4,10,16] [--pairs 150] [--images 50] [--docs 250]
                                [--text-rows 20000] [--stages clean,tokenize,pack]

Issue 7 item 6: 16x the data within 20x the time. Issue 8 item 5: each stage's peak memory
at 10x within 1.3x of 1x. A demo corpus (pipelines.demo_data, no eval splits) of
``scale x (--pairs, --images, --docs)`` is generated per scale (untimed; text is capped by
the number of stdlib docstrings), plus ``scale x --text-rows`` short synthetic text rows
(JSONL, 5000 per file, ~1% exact and ~1% near copies): many cheap rows, so that any
per-row state a stage keeps (in its driver or in one task) shows in its peak memory. The
tokenizers are made once, untimed: sentencepiece trained on the 1x cleaned text, and a
tiny VQ-KD with seeded random weights (tokenizing costs the same whatever the weights).
Then each stage runs, scale by scale, as its own process
(``python -m benchmarks.growth --child STAGE ...``), which calls the pipelines function
exactly as stages/<name>.py does and starts its own local Ray, as ``dvc repro`` would.

The parent samples that process and all its descendants (driver, Ray workers, Ray
daemons) with psutil every ``--interval`` s (benchmarks.data_common.TreeMonitor):

- time: wall seconds of the process (Ray start and stop included) and CPU seconds;
- memory: peak RSS of the driver, of the largest single Ray worker, and the peak sum of
  PSS over the tree (shared pages - Ray's object store, shared libraries - split between
  the processes that map them, so they count once).

Linearity is judged twice: the issue's ratio T(16x) / T(1x) <= 20, which a fixed start-up
cost makes easy, and a least-squares line through the CPU seconds of all scales (fixed +
per-1x cost) whose residuals a super-linear step would make large.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.common import print_table
from benchmarks.data_common import TreeMonitor, load_note, mib, ratio

STAGES = ("clean", "tokenize", "pack")
MEMORY_LIMIT = 1.3
WORKER_NICENESS = {"RAY_worker_niceness": "0"}  # as under a Ray Job (see benchmarks.tokenize_throughput)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", default="1,4,10,16", help="corpus multiples, comma-separated; the first is 1x")
    p.add_argument("--pairs", type=int, default=150, help="image-caption pairs at 1x")
    p.add_argument("--images", type=int, default=50, help="caption-less images at 1x")
    p.add_argument("--docs", type=int, default=250, help="text documents at 1x (stdlib has ~4.8k)")
    p.add_argument("--text-rows", type=int, default=20000, help="short synthetic text rows at 1x")
    p.add_argument("--stages", default=",".join(STAGES), help="stages to run, comma-separated, in pipeline order")
    p.add_argument("--vocab-size", type=int, default=500, help="sentencepiece vocabulary (trained on the 1x text)")
    p.add_argument("--interval", type=float, default=0.2, help="psutil sampling interval, seconds")
    p.add_argument("--tmp", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--metrics-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def scale_dirs(root: str, scale: int) -> dict:
    base = os.path.join(root, f"x{scale}")
    return {"demo": os.path.join(base, "demo"), "clean": os.path.join(base, "clean"),
            "tokenized": os.path.join(base, "tokenized"), "shards": os.path.join(base, "shards"),
            "text_tokenizer": os.path.join(root, "text_tokenizer"),
            "visual_tokenizer": os.path.join(root, "visual_tokenizer")}


def sources(demo_dir: str):
    from pipelines.clean.sources import SourceConfig

    return [SourceConfig("demo_text", "text", "jsonl", os.path.join(demo_dir, "text")),
            SourceConfig("demo_images", "image", "folder", os.path.join(demo_dir, "images")),
            SourceConfig("demo_pairs", "pair", "webdataset", os.path.join(demo_dir, "pairs"))] + \
        ([SourceConfig("many_rows", "text", "jsonl", os.path.join(demo_dir, "rows"))]
         if os.path.isdir(os.path.join(demo_dir, "rows")) else [])


def write_text_rows(folder: str, rows: int, seed: int = 0, per_file: int = 5000) -> int:
    """``rows`` short prose-like documents of 10-24 made-up words (kept by the text filters),
    about 1% exact and 1% near (one word changed) copies of recent rows; returns bytes."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    vocab = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    os.makedirs(folder, exist_ok=True)
    recent: list[list[str]] = []  # copies come from the last 200 rows
    lines, size = [], 0
    for i in range(rows):
        roll = rng.random()
        words = list(rng.choice(recent)) if recent and roll < 0.02 else \
            [rng.choice(vocab) for _ in range(rng.randint(10, 24))]
        if 0.01 <= roll < 0.02 and recent:
            words[rng.randrange(len(words))] = rng.choice(vocab)
        recent = (recent + [words])[-200:]
        lines.append(json.dumps({"id": f"r{i}", "text": " ".join(words).capitalize() + "."}) + "\n")
        if len(lines) == per_file or i == rows - 1:
            with open(os.path.join(folder, f"rows-{i // per_file:05d}.jsonl"), "w") as f:
                f.write("".join(lines))
            size += sum(map(len, lines))
            lines = []
    return size


def run_child(stage: str, dirs: dict) -> dict:
    """One stage, as stages/<stage>.py runs it (default params, its own Ray); returns metrics."""
    from pipelines.common.ray_session import RayConfig

    ray_cfg = RayConfig()
    if stage == "clean":
        from pipelines.clean import CleanConfig, clean_sources

        return clean_sources(sources(dirs["demo"]), CleanConfig(out_dir=dirs["clean"]), ray_cfg)
    if stage == "tokenize":
        from pipelines.tokenize import TokenizeConfig, tokenize_corpus

        return tokenize_corpus(TokenizeConfig(out_dir=dirs["tokenized"]), dirs["clean"], dirs["text_tokenizer"],
                               dirs["visual_tokenizer"], ray_cfg)
    from pipelines.pack import PackConfig, pack_shards

    return pack_shards(PackConfig(out_dir=dirs["shards"]), dirs["tokenized"], ray_cfg)


# ----------------------------------------------------------------------------- parent

def make_corpus(dirs: dict, scale: int, args) -> dict:
    from pipelines.demo_data import DemoDataConfig, generate_demo_data

    cfg = DemoDataConfig(out_dir=dirs["demo"], num_pairs=args.pairs * scale, num_images=args.images * scale,
                         max_text_docs=args.docs * scale, num_retrieval_train=0, num_retrieval_test=0,
                         num_probe_train=0, num_probe_val=0)
    m = generate_demo_data(cfg)
    if m["text_docs"] < args.docs * scale:
        print(f"note: x{scale} has {m['text_docs']} text documents, not {args.docs * scale} (stdlib cap)")
    rows_bytes = write_text_rows(os.path.join(dirs["demo"], "rows"), args.text_rows * scale) if args.text_rows else 0
    return {"pairs": m["pairs"], "images": m["images"], "docs": m["text_docs"], "rows": args.text_rows * scale,
            "bytes": m["bytes"] + rows_bytes}


def make_tokenizers(dirs: dict, vocab_size: int) -> None:
    import torch

    from model.vqkd import VQKD, vqkd_preset
    from pipelines.common.ray_session import RayConfig
    from pipelines.text_tokenizer import TextTokenizerConfig, train_text_tokenizer

    train_text_tokenizer(TextTokenizerConfig(out_dir=dirs["text_tokenizer"], vocab_size=vocab_size), dirs["clean"],
                         RayConfig())
    torch.manual_seed(0)
    VQKD(vqkd_preset("tiny")).save(dirs["visual_tokenizer"])


def measure_stage(stage: str, dirs_root: str, scale: int, interval: float) -> dict:
    metrics_file = os.path.join(dirs_root, f"metrics-{stage}-x{scale}.json")
    cmd = [sys.executable, "-m", "benchmarks.growth", "--child", stage, "--dir", json.dumps(scale_dirs(dirs_root, scale)),
           "--metrics-out", metrics_file]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**WORKER_NICENESS, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", **os.environ})
    with TreeMonitor(root_pid=proc.pid, interval=interval, pss=True) as mon:
        _, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{stage} x{scale} failed ({proc.returncode}):\n{err[-4000:]}")
    with open(metrics_file) as f:
        metrics = json.load(f)
    u = mon.usage
    return {"wall_s": wall, "cpu_s": u.cpu_total, "cpu_by_role": dict(u.cpu_s),
            "peak_driver_rss": u.peak_rss["driver"], "peak_worker_rss": u.peak_rss["workers"],
            "peak_tree_pss": u.peak_tree_pss, "peak_tree_rss": u.peak_tree_rss,
            "processes": u.max_processes, "samples": u.samples, "load": os.getloadavg()[0],
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        metrics = run_child(args.child, json.loads(args.dir))
        with open(args.metrics_out, "w") as f:
            json.dump(metrics, f, default=str)
        return metrics
    scales = [int(s) for s in args.scales.split(",")]
    stages = [st for st in STAGES if st in args.stages.split(",")]
    if scales[0] != 1 or sorted(scales) != scales:
        raise SystemExit("--scales: ascending, starting with 1")
    root = args.tmp or tempfile.mkdtemp(prefix="bench-growth-")
    results: dict = {"scales": scales, "corpus": {}, "stages": {s: {} for s in stages}}
    try:
        for scale in scales:
            results["corpus"][scale] = make_corpus(scale_dirs(root, scale), scale, args)
        for scale in scales:  # stage by stage, scale by scale: the tokenizers come from the 1x clean output
            for stage in stages:
                results["stages"][stage][scale] = measure_stage(stage, root, scale, args.interval)
                if scale == 1 and stage == "clean" and "tokenize" in stages:
                    make_tokenizers(scale_dirs(root, 1), args.vocab_size)
            for key in ("demo", "clean", "tokenized"):  # keep the disk small: finished scales go
                shutil.rmtree(scale_dirs(root, scale)[key], ignore_errors=True)
    finally:
        if not args.tmp:
            shutil.rmtree(root, ignore_errors=True)
    return summarize(results)


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (xs, ys)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def summarize(results: dict) -> dict:
    scales, stages = results["scales"], results["stages"]
    first, last = scales[0], scales[-1]
    mid = 10 if 10 in scales else scales[len(scales) // 2]
    total = {s: sum(stages[st][s]["wall_s"] for st in stages) for s in scales}
    total_cpu = {s: sum(stages[st][s]["cpu_s"] for st in stages) for s in scales}
    results["total_wall_s"], results["total_cpu_s"] = total, total_cpu
    results["time_ratio"] = ratio(total[last], total[first])
    results["cpu_ratio"] = ratio(total_cpu[last], total_cpu[first])
    if len(scales) >= 3:  # least-squares line CPU = fixed + per_x * scale; residuals show curvature
        fixed, per_x = linear_fit(scales, [total_cpu[s] for s in scales])
        results["cpu_fit"] = {"fixed_s": fixed, "per_1x_s": per_x, "max_residual": max(
            abs(total_cpu[s] - fixed - per_x * s) / total_cpu[s] for s in scales)}
    results["memory_ratios"] = {st: {key: ratio(stages[st][mid][key], stages[st][first][key])
                                     for key in ("peak_driver_rss", "peak_worker_rss", "peak_tree_pss")}
                                for st in stages}
    results["memory_scale"] = mid
    print_growth(results)
    return results


def print_growth(results: dict) -> None:
    scales, stages, corpus = results["scales"], results["stages"], results["corpus"]
    print(f"growth: {load_note()}")
    print(f"clean metrics per scale: " + "; ".join(
        f"x{s} rows_in {r['metrics'].get('rows_in')}, kept {r['metrics'].get('kept')}, rejected "
        f"{r['metrics'].get('rejected')}" for s, r in stages.get("clean", {}).items()))
    print("corpus per scale: " + "; ".join(f"x{s} {c['pairs']} pairs, {c['images']} images, {c['docs']} docs, "
                                           f"{c['rows']} short rows, {c['bytes'] / 1e6:.1f} MB" for s, c in corpus.items()))
    rows = []
    for st in stages:
        for s in scales:
            r = stages[st][s]
            rows.append([st, f"x{s}", f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", mib(r["peak_driver_rss"]),
                         mib(r["peak_worker_rss"]), mib(r["peak_tree_pss"]), f"{r['load']:.0f}"])
    print_table(["stage", "scale", "wall s", "CPU s", "driver RSS", "max worker RSS", "tree PSS", "load"], rows)
    first, last = scales[0], scales[-1]
    print(f"time x{last} / x{first}: wall {results['time_ratio']:.2f}x, CPU {results['cpu_ratio']:.2f}x "
          f"(limit {20 * last / 16:.0f}x for {last}x data)")
    if "cpu_fit" in results:
        f = results["cpu_fit"]
        print(f"CPU s of the three stages = {f['fixed_s']:.1f} fixed (3 Ray starts, worker imports) + "
              f"{f['per_1x_s']:.2f} per 1x of data; largest residual {100 * f['max_residual']:.0f}% "
              "(small = linear)")
    mid = results["memory_scale"]
    for st, r in results["memory_ratios"].items():
        print(f"peak memory x{mid} / x{first}, {st}: driver {r['peak_driver_rss']:.2f}x, largest worker "
              f"{r['peak_worker_rss']:.2f}x, tree PSS {r['peak_tree_pss']:.2f}x (limit {MEMORY_LIMIT}x)")


if __name__ == "__main__":
    main()
