"""The paper-variant giant (~1.9B parameters with heads) training on ONE GPU (issue 7 item 1).

    python -m benchmarks.giant_one_gpu                          # batch 32 plain, 64 checkpointed
    python -m benchmarks.giant_one_gpu --compile static

Two phases, each with a freshly built model so their peak memories are independent:
without activation checkpointing (default batch 32) and with it (default batch 64). Each
reports samples/s, MFU against the bf16 matmul peak measured in the same run (FLOP formula
in benchmarks.common) and peak memory. The step is benchmarks.common.Trainer's: image-text
pairs (257 image + 64 text tokens at patch 14), MLM + MIM heads at masked positions, bf16
autocast, grad clip, AdamW with float32 master weights and states. A phase that runs out of
GPU memory is reported as OOM and the next one still runs.

Without a GPU it runs a shrunken paper-variant config (giant's patch size, FFN ratio and
3 VL-expert layers at width 128, depth 4, 56 px) on the CPU in float32, to validate the
script; its figures say nothing about the GPU.
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from benchmarks.common import (
    Trainer,
    device_name,
    fmt_bytes,
    interleaved,
    matmul_peak,
    pair_batch,
    pick_device,
    pretrain_task,
    print_table,
    train_flops,
)
from model.beit3 import BEiT3
from model.config import beit3_preset

VISUAL_VOCAB = 8192
DEFAULTS = {
    "cuda": dict(batch=32, ckpt_batch=64, text_len=64, steps=10, warmup=2, shrink={}),
    "cpu": dict(batch=4, ckpt_batch=8, text_len=16, steps=2, warmup=1,
                shrink=dict(dim=128, depth=4, num_heads=4, ffn_dim=544, image_size=56, vocab_size=8192)),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.giant_one_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, help="pairs per step without checkpointing (default 32 GPU)")
    p.add_argument("--ckpt-batch", type=int, help="pairs per step with checkpointing (default 64 GPU; 0 skips)")
    p.add_argument("--text-len", type=int, help="caption tokens (default 64 GPU)")
    p.add_argument("--steps", type=int, help="timed steps per phase")
    p.add_argument("--warmup", type=int, help="untimed steps per phase first")
    p.add_argument("--compile", choices=("off", "static", "dynamic"), default="off",
                   help="torch.compile each layer")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run_phase(args, device, checkpoint: bool, batch_size: int, shrink: dict, peak: float) -> dict:
    """Build the model, train `args.steps` timed steps, return this phase's figures."""
    cfg = beit3_preset("giant", variant="paper", checkpoint_activations=checkpoint, **shrink)
    torch.manual_seed(args.seed)
    with torch.device(device):
        task = pretrain_task(BEiT3(cfg), VISUAL_VOCAB)
    params = sum(p.numel() for p in task.parameters())
    batch = pair_batch(cfg, batch_size, args.text_len, VISUAL_VOCAB, padded=True, seed=args.seed)
    masks = task.masker(batch, generator=args.seed)
    flops = train_flops(cfg, batch, masks, cfg.vocab_size, VISUAL_VOCAB)
    batch, masks = batch.to(device), masks.to(device)
    if args.compile != "off":
        for layer in task.model.layers:
            layer.compile(dynamic=args.compile == "dynamic")
    trainer = Trainer("giant", task, device)
    figures = dict(checkpoint=checkpoint, batch=batch_size, params=params, tokens=1 + cfg.num_patches + args.text_len)
    try:
        interleaved([trainer], batch, masks, args.warmup, rounds=1, steps_per_round=args.steps)
    except torch.OutOfMemoryError:
        return dict(figures, oom=True)
    sps = trainer.samples_per_s
    return dict(figures, oom=False, samples_per_s=sps, tflops=sps * flops / batch_size / 1e12,
                mfu=sps * flops / batch_size / peak, peak_mem_bytes=trainer.peak_bytes or None)


def main(argv=None) -> dict:
    """Run both phases, print the table, return the figures."""
    started = time.perf_counter()
    args = parse_args(argv)
    device = pick_device(args.device)
    defaults = DEFAULTS[device.type]
    for key in ("batch", "ckpt_batch", "text_len", "steps", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.threads:
        torch.set_num_threads(args.threads)
    shrink = defaults["shrink"]
    if shrink:
        print(f"No GPU: CPU run of a shrunken paper-variant giant {shrink} in float32, "
              "to validate the script; the GPU figures need a CUDA device.")
    peak, peak_dtype = matmul_peak(device)
    phases = [(False, args.batch)] + ([(True, args.ckpt_batch)] if args.ckpt_batch else [])
    rows = []
    for checkpoint, batch_size in phases:
        rows.append(run_phase(args, device, checkpoint, batch_size, shrink, peak))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = dict(device=device.type, device_name=device_name(device), shrunk=bool(shrink), compile=args.compile,
                  peak_flops=peak, peak_dtype=peak_dtype, phases=rows, seconds=time.perf_counter() - started)
    _print(result, args.text_len)
    return result


def _print(result: dict, text_len: int) -> None:
    first = result["phases"][0]
    print(f"paper-variant giant{' (shrunk)' if result['shrunk'] else ''}: {first['params'] / 1e6:.1f}M parameters "
          f"with heads, image-text pairs of {first['tokens'] - text_len} image + {text_len} text tokens, "
          f"{'bf16 autocast' if result['device'] == 'cuda' else 'float32'}, {result['device_name']}, "
          f"compile={result['compile']}")
    print(f"matmul peak ({result['peak_dtype']}, measured): {result['peak_flops'] / 1e12:.2f} TFLOP/s")
    rows = []
    for ph in result["phases"]:
        label = "activation checkpointing" if ph["checkpoint"] else "no checkpointing"
        if ph["oom"]:
            rows.append([label, str(ph["batch"]), "OOM", "", "", ""])
            continue
        rows.append([label, str(ph["batch"]), f"{ph['samples_per_s']:.2f}", f"{ph['tflops']:.2f}",
                     f"{100 * ph['mfu']:.1f}%", fmt_bytes(ph["peak_mem_bytes"])])
    print_table(["phase", "batch", "samples/s", "TFLOP/s", "MFU", "peak mem"], rows)
    print(f"total {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
