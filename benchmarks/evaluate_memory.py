"""Peak memory of evaluate's retrieval + linear probe on evaluation sets 1x and 10x the demo's.

    python -m benchmarks.evaluate_memory [--scales 1,10] [--train 1000] [--test 500]
                                         [--probe-train 600] [--probe-val 300] [--steps 5]
                                         [--batch-size 64] [--dim 64] [--depth 2] [--distinct]

Issue 15 item 6: evaluate streams its images from disk, so peak RSS on a retrieval set 10x
the demo's stays within 1.3x of the demo's. The probe's ImageFolder grows with the same factor.

Inputs, made once (untimed): the demo's evaluation sets at 1x (pipelines.demo_data: 96 px
scenes, a Karpathy dataset.json with captions, a shape-labelled ImageFolder), a sentencepiece
tokenizer trained on their captions (the text_tokenizer stage's code), and the demo's tiny
BEiT-3 narrowed to --dim / --depth with seeded random weights (memory does not depend on the
weights), exported by pipelines.common.task_files.export_task. A scale-k set holds k hard
links to every 1x file under distinct names, with its own dataset.json and ImageFolder: a
decode's memory does not depend on the pixels, and rendering every scene of x10 is slow
(--distinct renders every scale with the demo generator instead).

Each scale runs in its own process (``--child``) so peaks are separate. It calls
pipelines.evaluate.retrieval_and_probe as run_evaluation does - fine-tune, recall and probe,
for the pretrained and the random-init backbone; masked prediction reads shards, not these
sets, and is left out. Peak RSS: the child's own ru_maxrss (exact), and the parent's psutil
samples of it (benchmarks.data_common.TreeMonitor). For reference the table also gives what
loading every image at once took before: N x 3 x S^2 float32.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.common import print_table
from benchmarks.data_common import TreeMonitor, load_note, mib, ratio

MEMORY_LIMIT = 1.3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", default="1,10", help="set multiples, comma-separated; the first is 1x")
    p.add_argument("--train", type=int, default=1000, help="retrieval train images at 1x (the demo's)")
    p.add_argument("--test", type=int, default=500, help="retrieval test images at 1x (the demo's)")
    p.add_argument("--probe-train", type=int, default=600, help="probe train images at 1x (the demo's)")
    p.add_argument("--probe-val", type=int, default=300, help="probe val images at 1x (the demo's)")
    p.add_argument("--steps", type=int, default=5, help="retrieval fine-tune steps")
    p.add_argument("--batch-size", type=int, default=64, help="retrieval fine-tune batch (evaluate's default)")
    p.add_argument("--probe-steps", type=int, default=300, help="linear-probe steps (evaluate's default)")
    p.add_argument("--dim", type=int, default=64, help="model width (the tiny preset's is 192)")
    p.add_argument("--depth", type=int, default=2, help="model depth (the tiny preset's is 4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each evaluation")
    p.add_argument("--distinct", action="store_true", help="render distinct scenes at every scale (slow)")
    p.add_argument("--interval", type=float, default=0.1, help="psutil sampling interval, seconds")
    p.add_argument("--tmp", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- inputs

def render_sets(out_dir: str, args, scale: int) -> str:
    """The demo generator's evaluation sets only, ``scale`` x the 1x sizes -> their eval folder."""
    from pipelines.demo_data import DemoDataConfig, generate_demo_data

    generate_demo_data(DemoDataConfig(
        out_dir=out_dir, num_pairs=0, num_images=0, max_text_docs=0, num_retrieval_train=args.train * scale,
        num_retrieval_test=args.test * scale, num_probe_train=args.probe_train * scale,
        num_probe_val=args.probe_val * scale))
    return os.path.join(out_dir, "eval")


def linked_sets(base_eval: str, out_eval: str, scale: int) -> str:
    """``scale`` hard-linked copies of every file of the 1x sets, as new Karpathy entries and
    ImageFolder files (copy c of x.png is c{c}-x.png) -> out_eval."""
    with open(os.path.join(base_eval, "retrieval", "dataset.json")) as f:
        entries = json.load(f)["images"]
    os.makedirs(os.path.join(out_eval, "retrieval", "images"))
    images = []
    for c in range(scale):
        for e in entries:
            name = f"c{c}-{e['filename']}"
            os.link(os.path.join(base_eval, "retrieval", e["filepath"], e["filename"]),
                    os.path.join(out_eval, "retrieval", "images", name))
            images.append({"filepath": "images", "filename": name, "split": e["split"], "sentences": e["sentences"]})
    with open(os.path.join(out_eval, "retrieval", "dataset.json"), "w") as f:
        json.dump({"images": images}, f)
    src = os.path.join(base_eval, "classification")
    for folder, _, files in os.walk(src):
        dest = os.path.join(out_eval, "classification", os.path.relpath(folder, src))
        os.makedirs(dest, exist_ok=True)
        for c in range(scale):
            for name in files:
                os.link(os.path.join(folder, name), os.path.join(dest, f"c{c}-{name}"))
    return out_eval


def make_tokenizer(eval_dir: str, out_dir: str) -> None:
    """A small sentencepiece model trained on the retrieval captions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from model.text_tokenizer import TextTokenizer
    from pipelines.text_tokenizer import (
        TextTokenizerConfig,
        train_model,
        write_tokenizer,
    )

    with open(os.path.join(eval_dir, "retrieval", "dataset.json")) as f:
        texts = [s["raw"] for e in json.load(f)["images"] for s in e["sentences"]]
    corpus = out_dir + ".parquet"
    pq.write_table(pa.table({"text": texts}), corpus)
    model_bytes, _ = train_model(TextTokenizerConfig(out_dir=out_dir, vocab_size=40), [(corpus, "text")])
    write_tokenizer(out_dir, model_bytes, TextTokenizer.from_bytes(model_bytes))


def make_model(tokenizer_dir: str, out_dir: str, dim: int, depth: int) -> None:
    """The demo's tiny preset at width ``dim`` and ``depth`` layers, seeded, exported."""
    import torch

    from model.text_tokenizer import TextTokenizer
    from pipelines.common.configs import build
    from pipelines.common.task_files import build_task, export_task, task_spec
    from pipelines.pretrain import PretrainConfig

    heads = max(1, dim // 32)
    paths = {"out_dir": out_dir, "checkpoint_dir": out_dir + "-checkpoints", "plots_path": out_dir + ".csv"}
    cfg = build(PretrainConfig, {**paths, "model": {"preset": "tiny", "overrides": {
        "dim": dim, "depth": depth, "num_heads": heads, "ffn_dim": 4 * dim}}}, "pretrain")
    tokenizer = TextTokenizer(tokenizer_dir)
    spec = task_spec(cfg, {"vocab_size": tokenizer.vocab_size, **tokenizer.special_ids}, visual_vocab_size=64)
    torch.manual_seed(0)
    export_task(build_task(spec), spec, out_dir)


# ----------------------------------------------------------------------------- child

def run_child(job: dict) -> dict:
    """retrieval_and_probe on one scale's sets, as run_evaluation calls it -> metrics + peak RSS."""
    import torch

    from model.text_tokenizer import TextTokenizer
    from pipelines.common.configs import build
    from pipelines.evaluate import EvaluateConfig, retrieval_and_probe

    torch.set_num_threads(job["threads"])
    cfg = build(EvaluateConfig, {
        "retrieval": {"dataset": os.path.join(job["eval"], "retrieval", "dataset.json"), "steps": job["steps"],
                      "batch_size": job["batch_size"], "warmup_steps": 1},
        "probe": {"root": os.path.join(job["eval"], "classification"), "steps": job["probe_steps"]},
        "threads": job["threads"]}, "evaluate")
    start, cpu = time.perf_counter(), time.process_time()
    metrics = retrieval_and_probe(cfg, job["model"], TextTokenizer(job["tokenizer"]), torch.device("cpu"))
    return {"metrics": metrics, "eval_s": time.perf_counter() - start, "eval_cpu_s": time.process_time() - cpu,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# ----------------------------------------------------------------------------- parent

def measure(job: dict, interval: float) -> dict:
    """One scale in its own process; its peak RSS sampled by psutil and its own ru_maxrss."""
    out = job["eval"] + ".result.json"
    cmd = [sys.executable, "-m", "benchmarks.evaluate_memory", "--child", json.dumps({**job, "out": out})]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeMonitor(root_pid=proc.pid, interval=interval) as mon:
        _, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"evaluation of {job['eval']} failed ({proc.returncode}):\n{err[-4000:]}")
    with open(out) as f:
        result = json.load(f)
    result.update(wall_s=time.perf_counter() - start, cpu_s=mon.usage.cpu_total,
                  sampled_rss=mon.usage.peak_rss["driver"])
    return result


def stacked_bytes(metrics: dict, image_size: int) -> int:
    """What the old loader held: every retrieval and probe image as float32 (N, 3, S, S)."""
    r, p = metrics["retrieval"]["data"], metrics["probe"]["data"]
    return (r["train"] + r["test"] + p["train"] + p["val"]) * 3 * image_size**2 * 4


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        result = run_child(job)
        with open(job["out"], "w") as f:
            json.dump(result, f)
        return result
    scales = [int(s) for s in args.scales.split(",")]
    if scales[0] != 1 or sorted(scales) != scales:
        raise SystemExit("--scales: ascending, starting with 1")
    root = args.tmp or tempfile.mkdtemp(prefix="bench-evaluate-memory-")
    try:
        base = render_sets(os.path.join(root, "demo-x1"), args, 1)
        make_tokenizer(base, os.path.join(root, "text_tokenizer"))
        make_model(os.path.join(root, "text_tokenizer"), os.path.join(root, "model"), args.dim, args.depth)
        runs = {}
        for scale in scales:
            eval_dir = render_sets(os.path.join(root, f"demo-x{scale}"), args, scale) if args.distinct \
                else linked_sets(base, os.path.join(root, f"x{scale}"), scale)
            job = {"eval": eval_dir, "model": os.path.join(root, "model"), "tokenizer": os.path.join(root, "text_tokenizer"),
                   "steps": args.steps, "batch_size": args.batch_size, "probe_steps": args.probe_steps,
                   "threads": args.threads}
            runs[scale] = measure(job, args.interval)
    finally:
        if not args.tmp:
            shutil.rmtree(root, ignore_errors=True)
    return summarize(scales, runs)


def summarize(scales: list[int], runs: dict) -> dict:
    from model.config import beit3_preset

    image_size = beit3_preset("tiny").image_size
    first, last = scales[0], scales[-1]
    results = {"scales": scales, "runs": runs,
               "rss_ratio": ratio(runs[last]["ru_maxrss"], runs[first]["ru_maxrss"]),
               "sampled_rss_ratio": ratio(runs[last]["sampled_rss"], runs[first]["sampled_rss"])}
    print(f"evaluate memory: {load_note()}")
    rows = []
    for s in scales:
        r, m = runs[s], runs[s]["metrics"]
        d, p = m["retrieval"]["data"], m["probe"]["data"]
        rows.append([f"x{s}", f"{d['train']} / {d['test']}", f"{p['train']} / {p['val']}", f"{r['wall_s']:.0f}",
                     f"{r['cpu_s']:.0f}", mib(r["ru_maxrss"]), mib(r["sampled_rss"]),
                     mib(stacked_bytes(m, image_size)), f"{m['retrieval']['pretrained']['mean_r1']:.3f}"])
    print_table(["scale", "retrieval train / test", "probe train / val", "wall s", "CPU s", "peak RSS",
                 "sampled RSS", "old stacked tensors", "mean R@1"], rows)
    print(f"peak RSS x{last} / x{first}: {results['rss_ratio']:.2f}x (sampled {results['sampled_rss_ratio']:.2f}x; "
          f"target <= {MEMORY_LIMIT}x)")
    return results


if __name__ == "__main__":
    main()
