"""Growth of clean + tokenize + pack with the corpus: time (linear?) and peak memory (bounded?).

    python -m benchmarks.growth [--scales 1,10,100] [--pairs 350] [--images 150] [--docs 250]
                                [--text-rows 20000] [--stages clean,tokenize,pack]

Issue 14 item 6 (the defaults): a corpus at 1x, 10x and 100x, 100x being 2M short text rows
plus 50k images (35k pairs + 15k caption-less images), each stage run as dvc runs it, with
verdicts per stage between the two largest scales - driver peak RSS within 1.1x, CPU seconds
per input row within 1.3x, clean's dedup bytes read per row within 1.3x - and the largest
Ray worker's peak within a bound from the stages' configuration (formulas:
benchmarks.growth_report). Issue 7 item 6 (16x the data within 20x the time) and issue 8
item 5 (each stage's peak memory at 10x within 1.3x of 1x) are printed too.

A demo corpus (pipelines.demo_data, no eval splits) of ``scale x (--pairs, --images, --docs)``
is generated per scale, just before that scale runs (untimed; text is capped by the number of
stdlib docstrings, ~4.8k), plus ``scale x --text-rows`` short synthetic text
rows (JSONL, 5000 per file, written file by file, ~1% exact and ~1% near copies): many cheap
rows, so that any per-row state a stage keeps (in its driver or in one task) shows in its
peak memory. A scale's inputs and intermediate outputs are deleted once it is done, so the
disk holds one scale at a time. Generating is cheap next to the stages (~0.4 ms per scene,
~8 us per text row on one core: about a minute at 100x), so the scales are not built from
one another's files: that would save only the 11% that 1x + 10x add to 100x. The tokenizers are made once, untimed: sentencepiece trained
on the 1x cleaned text, and a tiny VQ-KD with seeded random weights (tokenizing costs the
same whatever the weights). Then each stage runs, scale by scale, as its own process
(``python -m benchmarks.growth --child STAGE ...``), which calls the pipelines function
exactly as stages/<name>.py does, with the configs of :func:`stage_configs`, and starts its
own local Ray, as ``dvc repro`` would; meanwhile the parent only waits and samples.

The parent samples that process and all its descendants (driver, Ray workers, Ray
daemons) with psutil every ``--interval`` s (benchmarks.data_common.TreeMonitor):

- time: wall seconds of the process (Ray start and stop included) and CPU seconds, and
  CPU seconds per input row (the rows from the stage's metrics);
- memory: peak RSS of the driver, of the largest single Ray worker, and the peak sum of
  PSS over the tree (shared pages - Ray's object store, shared libraries - split between
  the processes that map them, so they count once);
- clean's ``dedup.bytes_read`` metric per input row.

Linearity is also judged by a least-squares line through the CPU seconds of all scales
(fixed + per-1x cost) whose residuals a super-linear step would make large.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.data_common import TreeMonitor
from benchmarks.growth_report import allowances, linear_fit, stage_rows, summarize

STAGES = ("clean", "tokenize", "pack")
VQKD_PRESET = "tiny"
WORKER_NICENESS = {"RAY_worker_niceness": "0"}  # as under a Ray Job (see benchmarks.tokenize_throughput)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", default="1,10,100", help="corpus multiples, comma-separated, ascending; the first is 1x")
    p.add_argument("--pairs", type=int, default=350, help="image-caption pairs at 1x")
    p.add_argument("--images", type=int, default=150, help="caption-less images at 1x")
    p.add_argument("--docs", type=int, default=250, help="text documents at 1x (stdlib has ~4.8k)")
    p.add_argument("--text-rows", type=int, default=20000, help="short synthetic text rows at 1x")
    p.add_argument("--stages", default=",".join(STAGES), help="stages to run, comma-separated, in pipeline order")
    p.add_argument("--vocab-size", type=int, default=500, help="sentencepiece vocabulary (trained on the 1x text)")
    p.add_argument("--interval", type=float, default=0.5, help="psutil sampling interval, seconds")
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


def stage_configs(dirs: dict) -> dict:
    """The config each stage runs with: the dataclass defaults (params.yaml's values) with this
    run's folders; the worker memory bounds of benchmarks.growth_report come from the same."""
    from pipelines.clean import CleanConfig
    from pipelines.pack import PackConfig
    from pipelines.tokenize import TokenizeConfig

    return {"clean": CleanConfig(out_dir=dirs["clean"]), "tokenize": TokenizeConfig(out_dir=dirs["tokenized"]),
            "pack": PackConfig(out_dir=dirs["shards"])}


def write_text_rows(folder: str, rows: int, seed: int = 0, per_file: int = 5000) -> int:
    """``rows`` short prose-like documents of 10-24 made-up words (kept by the text filters),
    about 1% exact and 1% near (one word changed) copies of recent rows, written file by file
    (memory: one file); returns bytes."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    vocab = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    os.makedirs(folder, exist_ok=True)
    recent: collections.deque[list[str]] = collections.deque(maxlen=200)  # copies come from the last 200 rows
    lines, size = [], 0
    for i in range(rows):
        roll = rng.random()
        words = list(rng.choice(recent)) if recent and roll < 0.02 else \
            [rng.choice(vocab) for _ in range(rng.randint(10, 24))]
        if 0.01 <= roll < 0.02 and recent:
            words[rng.randrange(len(words))] = rng.choice(vocab)
        recent.append(words)
        lines.append(json.dumps({"id": f"r{i}", "text": " ".join(words).capitalize() + "."}) + "\n")
        if len(lines) == per_file or i == rows - 1:
            with open(os.path.join(folder, f"rows-{i // per_file:05d}.jsonl"), "w") as f:
                f.write("".join(lines))
            size += sum(map(len, lines))
            lines = []
    return size


def run_child(stage: str, dirs: dict) -> dict:
    """One stage, as stages/<stage>.py runs it (stage_configs, its own Ray); returns metrics."""
    from pipelines.common.ray_session import RayConfig

    ray_cfg, cfg = RayConfig(), stage_configs(dirs)[stage]
    if stage == "clean":
        from pipelines.clean import clean_sources

        return clean_sources(sources(dirs["demo"]), cfg, ray_cfg)
    if stage == "tokenize":
        from pipelines.tokenize import tokenize_corpus

        return tokenize_corpus(cfg, dirs["clean"], dirs["text_tokenizer"], dirs["visual_tokenizer"], ray_cfg)
    from pipelines.pack import pack_shards

    return pack_shards(cfg, dirs["tokenized"], ray_cfg)


# ----------------------------------------------------------------------------- parent

def make_corpus(dirs: dict, scale: int, args) -> dict:
    """Write one scale's inputs (untimed by the stages' figures); returns their counts, bytes and
    the seconds it took."""
    from pipelines.demo_data import DemoDataConfig, generate_demo_data

    start = time.perf_counter()
    cfg = DemoDataConfig(out_dir=dirs["demo"], num_pairs=args.pairs * scale, num_images=args.images * scale,
                         max_text_docs=args.docs * scale, num_retrieval_train=0, num_retrieval_test=0,
                         num_probe_train=0, num_probe_val=0)
    m = generate_demo_data(cfg)
    if m["text_docs"] < args.docs * scale:
        print(f"note: x{scale} has {m['text_docs']} text documents, not {args.docs * scale} (stdlib cap)")
    rows_bytes = write_text_rows(os.path.join(dirs["demo"], "rows"), args.text_rows * scale) if args.text_rows else 0
    return {"pairs": m["pairs"], "images": m["images"], "docs": m["text_docs"], "rows": args.text_rows * scale,
            "bytes": m["bytes"] + rows_bytes, "seconds": time.perf_counter() - start}


def make_tokenizers(dirs: dict, vocab_size: int) -> None:
    import torch

    from model.vqkd import VQKD, vqkd_preset
    from pipelines.common.ray_session import RayConfig
    from pipelines.text_tokenizer import TextTokenizerConfig, train_text_tokenizer

    train_text_tokenizer(TextTokenizerConfig(out_dir=dirs["text_tokenizer"], vocab_size=vocab_size), dirs["clean"],
                         RayConfig())
    torch.manual_seed(0)
    VQKD(vqkd_preset(VQKD_PRESET)).save(dirs["visual_tokenizer"])


def measure_stage(stage: str, dirs_root: str, scale: int, interval: float) -> dict:
    """Run one stage at one scale as its own process and sample its tree; returns the figures."""
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
    dedup = {"dedup_bytes_read": metrics["dedup"]["bytes_read"], "dedup_shards": metrics["dedup"]["shards"]} \
        if stage == "clean" else {}
    return {"wall_s": wall, "cpu_s": u.cpu_total, "cpu_by_role": dict(u.cpu_s), "rows": stage_rows(stage, metrics),
            "peak_driver_rss": u.peak_rss["driver"], "peak_worker_rss": u.peak_rss["workers"],
            "peak_tree_pss": u.peak_tree_pss, "peak_tree_rss": u.peak_tree_rss,
            "processes": u.max_processes, "samples": u.samples, "load": os.getloadavg()[0], **dedup,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}


def run_scales(root: str, scales: list[int], stages: list[str], args) -> dict:
    """Scale by scale: make its corpus, run the stages, delete its folders; returns the raw results."""
    results: dict = {"scales": scales, "corpus": {}, "stages": {s: {} for s in stages}}
    for scale in scales:
        dirs = scale_dirs(root, scale)
        results["corpus"][scale] = make_corpus(dirs, scale, args)
        for stage in stages:  # the tokenizers come from the 1x clean output
            results["stages"][stage][scale] = measure_stage(stage, root, scale, args.interval)
            if scale == scales[0] and stage == "clean" and "tokenize" in stages:
                make_tokenizers(dirs, args.vocab_size)
        for key in ("demo", "clean", "tokenized", "shards"):  # keep the disk small: finished scales go
            shutil.rmtree(dirs[key], ignore_errors=True)
        print(f"growth: x{scale} done ({sum(results['stages'][st][scale]['wall_s'] for st in stages):.0f} s)",
              flush=True)
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        metrics = run_child(args.child, json.loads(args.dir))
        with open(args.metrics_out, "w") as f:
            json.dump(metrics, f, default=str)
        return metrics
    scales = [int(s) for s in args.scales.split(",")]
    stages = [st for st in STAGES if st in args.stages.split(",")]
    if scales[0] != 1 or sorted(set(scales)) != scales or len(scales) < 2:
        raise SystemExit("--scales: two or more, ascending, starting with 1")
    root = args.tmp or tempfile.mkdtemp(prefix="bench-growth-")
    try:
        results = run_scales(root, scales, stages, args)
    finally:
        if not args.tmp:
            shutil.rmtree(root, ignore_errors=True)
    from model.vqkd import vqkd_preset

    return summarize(results, allowances(stage_configs(scale_dirs(root, 1)), vqkd_preset(VQKD_PRESET)))


__all__ = ["main", "linear_fit", "stage_configs", "write_text_rows", "STAGES"]


if __name__ == "__main__":
    main()
