"""The GPU benchmarks as one command, filling RESULTS.md's GPU tables.

    bash benchmarks/gpu_suite.sh            # on a machine with a CUDA GPU
    python -m benchmarks.gpu_suite --quick --results /tmp/RESULTS.md   # CPU smoke run

Runs, each guarded so one failure does not lose the others: training throughput (ours vs
torchscale 0.3.0, eager and compiled), the paper-variant giant on one GPU (with and
without activation checkpointing, eager and compiled), VQ-KD codes/s against the bare
encoder, and the per-worker loader (when benchmarks.loader exists). Each benchmark's table
replaces the block between ``<!-- gpu-suite:NAME -->`` and ``<!-- /gpu-suite:NAME -->`` in
the results file, headed by the device, the date and the command; the raw figures go to
``--json``. ``--quick`` runs the eager variants at the benchmarks' CPU sizes, to check the
suite itself where no GPU is lent.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import re
import traceback

RESULTS = "benchmarks/RESULTS.md"

TRAIN_RUNS = (("eager, batch 256", []), ("--compile static", ["--compile", "static"]),
              ("--compile dynamic (as pretrain.compile)", ["--compile", "dynamic"]),
              ("--compile static --no-padding", ["--compile", "static", "--no-padding"]))
GIANT_RUNS = (("eager", []), ("--compile static", ["--compile", "static"]))
# --quick: the smallest sizes that still run every phase, for a smoke run on the CPU
QUICK_TRAIN = ["--batch", "2", "--text-len", "8", "--steps", "2", "--rounds", "1", "--warmup", "1", "--threads", "1"]
QUICK_GIANT = ["--batch", "2", "--ckpt-batch", "2", "--text-len", "8", "--steps", "1", "--warmup", "1",
               "--threads", "1"]


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def gib(x) -> str:
    return "n/a" if not x else f"{x / 2**30:.1f} GiB"


def train_block(runs: list[tuple[str, dict]]) -> list[str]:
    rows = ["| command | ours samples/s | torchscale samples/s | ratio | ours MFU | ours / torchscale peak mem |",
            "|---|---|---|---|---|---|"]
    for label, r in runs:
        ours, theirs = r["impls"]["ours"], r["impls"].get("torchscale", {})
        rows.append(f"| `train_throughput` {label} | {ours['samples_per_s']:.1f} | "
                    f"{theirs.get('samples_per_s', float('nan')):.1f} | {r.get('ratio', float('nan')):.2f}x | "
                    f"{pct(ours['mfu'])} | {gib(ours['peak_mem_bytes'])} / {gib(theirs.get('peak_mem_bytes'))} |")
    return rows


def giant_block(runs: list[tuple[str, dict]]) -> list[str]:
    rows = ["| command | phase | batch | samples/s | MFU | peak mem |", "|---|---|---|---|---|---|"]
    for label, r in runs:
        for phase in r["phases"]:
            name = "activation checkpointing" if phase["checkpoint"] else "no checkpointing"
            figures = ("OOM", "", "") if phase["oom"] else (
                f"{phase['samples_per_s']:.1f}", pct(phase["mfu"]), gib(phase["peak_mem_bytes"]))
            rows.append(f"| `giant_one_gpu` {label} | {name} | {phase['batch']} | " + " | ".join(figures) + " |")
    return rows


def vqkd_block(rows_in: list[dict]) -> list[str]:
    rows = ["| preset | dtype | batch | encoder img/s | codes img/s | ratio |", "|---|---|---|---|---|---|"]
    rows += [f"| {r['preset']} | {r['dtype']} | {r['batch']} | {r['encoder']:.1f} | {r['codes']:.1f} | "
             f"{r['ratio']:.3f} |" for r in rows_in]
    return rows


def loader_block(result: dict) -> list[str]:
    rows = ["| mix | loader_workers | samples/s | samples/s per core |", "|---|---|---|---|"]
    rows += [f"| {r['mix']} | {r['workers']} | {r['samples_per_s']:.1f} | {r['per_core']:.1f} |"
             for r in result.get("rows", [])]
    return rows


def run_all(quick: bool) -> dict:
    """name -> (figures or None, block lines, command text)."""
    from benchmarks import giant_one_gpu, train_throughput, vqkd_codes

    out = {}

    def guarded(name, command, fn, block):
        print(f"== {name}: {command}", flush=True)
        try:
            figures = fn()
            out[name] = (figures, block(figures), command)
        except (Exception, SystemExit):  # noqa: BLE001 - a failed benchmark is reported, the suite goes on
            out[name] = (None, ["failed:", "", "```", traceback.format_exc()[-2000:], "```"], command)

    train = [(label, args + QUICK_TRAIN) for label, args in TRAIN_RUNS[:1]] if quick else TRAIN_RUNS
    giant = [(label, args + QUICK_GIANT) for label, args in GIANT_RUNS[:1]] if quick else GIANT_RUNS
    guarded("train_throughput", "python -m benchmarks.train_throughput [variants]",
            lambda: [(label, train_throughput.main(args)) for label, args in train], train_block)
    guarded("giant_one_gpu", "python -m benchmarks.giant_one_gpu [variants]",
            lambda: [(label, giant_one_gpu.main(args)) for label, args in giant], giant_block)
    vqkd_args = ["--preset", "tiny", "--repeats", "2"] if quick else ["--preset", "official-base", "--bf16"]
    guarded("vqkd_codes", "python -m benchmarks.vqkd_codes " + " ".join(vqkd_args),
            lambda: vqkd_codes.main(vqkd_args), vqkd_block)
    try:
        loader = importlib.import_module("benchmarks.loader")
    except ImportError:
        loader = None
    if loader is not None:
        loader_args = ["--quick"] if quick else []
        guarded("loader", "python -m benchmarks.loader " + " ".join(loader_args),
                lambda: loader.main(loader_args), loader_block)
    return out


def device_line() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no GPU: smoke run)"
    return f"{device}, torch {torch.__version__}, {datetime.date.today().isoformat()}"


def fill(results_text: str, name: str, lines: list[str]) -> str:
    """Replace the block of ``name`` (markers kept); a file without it gets it appended."""
    begin, end = f"<!-- gpu-suite:{name} -->", f"<!-- /gpu-suite:{name} -->"
    body = "\n".join([begin, *lines, end])
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(results_text):
        return pattern.sub(lambda _: body, results_text)
    return results_text.rstrip("\n") + f"\n\n## GPU suite: {name}\n\n{body}\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="eager variants at CPU sizes: a smoke run of the suite")
    p.add_argument("--results", default=RESULTS, help="markdown file whose gpu-suite blocks are replaced")
    p.add_argument("--json", default=None, help="also write the raw figures here")
    args = p.parse_args(argv)
    out = run_all(args.quick)
    text = open(args.results, encoding="utf-8").read()
    header = device_line()
    for name, (_, lines, command) in out.items():
        text = fill(text, name, [f"Measured by `bash benchmarks/gpu_suite.sh` ({command}): {header}.", "", *lines])
    with open(args.results, "w", encoding="utf-8") as f:
        f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({name: figures for name, (figures, _, _) in out.items()}, f, indent=1, default=str)
    failed = [name for name, (figures, _, _) in out.items() if figures is None]
    print(f"gpu suite: {len(out) - len(failed)} of {len(out)} benchmarks ran"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; tables written to {args.results}")
    return out


if __name__ == "__main__":
    main()
