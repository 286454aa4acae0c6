"""BEiT-3 pretraining-step throughput: ours against torchscale 0.3.0's BEiT3, same run.

    python -m benchmarks.train_throughput                      # GPU: base, batch 256, bf16
    python -m benchmarks.train_throughput --compile static     # torch.compile our layers
    python -m benchmarks.train_throughput --checkpoint         # our activation checkpointing

The step (issue 7 item 1) is the one pipelines.pretrain.loop runs, on an image-text pair batch
(197 image + 64 text tokens at base): masked captions (50%) and block-masked images (40%),
PretrainTask's MLM and MIM heads at masked positions, cross-entropy, backward, grad clip,
AdamW; bf16 autocast on GPU. torchscale's BEiT3 runs behind the very same PretrainTask
(heads, loss, masks) with our weights exported by model.checkpoint.export_official_beit3,
and a float32 parity check on a few samples comes first, so both compute the same thing.
Batches and masks are made once, before timing (in training, loader workers make them).

Without a GPU it runs on the CPU with the tiny preset in float32 (issue 7 item 2: ours
forward + backward not slower than torchscale) and says so. --compile and --checkpoint
apply to ours only (torchscale would need fairscale's checkpoint_wrapper).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import resource
import time

import torch
from torch import nn

from benchmarks.common import (
    Trainer,
    device_name,
    first_samples,
    fmt_bytes,
    interleaved,
    matmul_peak,
    median,
    pair_batch,
    pick_device,
    pretrain_task,
    print_table,
    train_flops,
)
from model.beit3 import BEiT3
from model.checkpoint import export_official_beit3
from model.config import beit3_preset
from model.task import PretrainTask

# per device type: the workload a run gets unless flags say otherwise
DEFAULTS = {
    "cuda": dict(preset="base", batch=256, text_len=64, vocab=None, steps=20, rounds=4, warmup=3),
    # vocab 8192 as the demo's sentencepiece model: with 64010 the text head and embedding
    # would outweigh the 4-layer tiny backbone this comparison is about
    "cpu": dict(preset="tiny", batch=16, text_len=32, vocab=8192, steps=16, rounds=16, warmup=1),
}
VISUAL_VOCAB = 8192
PARITY_SAMPLES = 4
PARITY_RTOL = 1e-4


class TorchscaleBackbone(nn.Module):
    """torchscale's BEiT3 behind our ``encode`` signature, so the same PretrainTask (heads,
    loss, masked positions) runs on top of it."""

    def __init__(self, reference: nn.Module, config):
        super().__init__()
        self.reference = reference
        self.config = config

    def encode(self, image=None, text=None, text_padding_mask=None, image_mask=None) -> torch.Tensor:
        """Same arguments and (B, T, D) result as model.beit3.BEiT3.encode."""
        return self.reference(textual_tokens=text, visual_tokens=image, text_padding_position=text_padding_mask,
                              vision_masked_position=image_mask)["encoder_out"]


def torchscale_task(ours: PretrainTask, device: torch.device) -> PretrainTask:
    """A PretrainTask on torchscale's BEiT3 holding exactly our backbone and head weights."""
    if importlib.util.find_spec("torchscale") is None:
        raise SystemExit("torchscale is not installed: pip install --no-deps torchscale==0.3.0 "
                         "(or pass --no-torchscale)")
    # the parity test's builder (torchscale's base recipe + test-only fairscale/timm shims)
    from tests.torchscale_reference import torchscale_model

    cfg = dataclasses.replace(ours.model.config, checkpoint_activations=False)
    with torch.device(device):
        reference = torchscale_model(cfg, normalize_output=cfg.final_norm)
        task = pretrain_task(TorchscaleBackbone(reference, cfg), ours.heads.image.proj.out_features)
    official = export_official_beit3(ours.model)["model"]
    reference.load_state_dict({k.removeprefix("beit3."): v for k, v in official.items()}, strict=True)
    task.heads.load_state_dict(ours.heads.state_dict())
    return task


@torch.no_grad()
def parity_gap(ours: PretrainTask, theirs: PretrainTask, batch, masks) -> float:
    """|loss ours - loss torchscale| in float32 eval mode on the first few samples; raises
    when it exceeds PARITY_RTOL relative (then the timing would compare different maths)."""
    sub, sub_masks = first_samples(batch, masks, PARITY_SAMPLES)
    losses = []
    for task in (ours, theirs):
        task.eval()
        losses.append(float(task(sub, masks=sub_masks).loss))
        task.train()
    gap = abs(losses[0] - losses[1])
    if gap > PARITY_RTOL * max(1.0, abs(losses[1])):
        raise RuntimeError(f"ours and torchscale disagree: loss {losses[0]:.6f} vs {losses[1]:.6f}")
    return gap


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__.split("\n")[0])
    p.add_argument("--preset", help="tiny|base|large|giant (default: base on GPU, tiny on CPU)")
    p.add_argument("--batch", type=int, help="image-text pairs per step (default: 256 GPU, 32 CPU)")
    p.add_argument("--text-len", type=int, help="caption tokens incl. <s> </s> (default: 64 GPU, 32 CPU)")
    p.add_argument("--vocab", type=int, help="text vocabulary (default: the preset's 64010; 8192 on CPU)")
    p.add_argument("--steps", type=int, help="timed steps per model, split over the rounds")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds")
    p.add_argument("--warmup", type=int, help="untimed steps per model first (compilation happens here)")
    p.add_argument("--compile", choices=("off", "static", "dynamic"), default="off",
                   help="torch.compile each of our layers (dynamic: as pipelines.pretrain.loop does)")
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing in our model")
    p.add_argument("--no-padding", action="store_true", help="every caption fills --text-len (no padding mask)")
    p.add_argument("--no-torchscale", action="store_true", help="time ours only")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the benchmark, print its table, return the figures."""
    started = time.perf_counter()
    args = parse_args(argv)
    device = pick_device(args.device)
    for key, value in DEFAULTS[device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        print(f"No GPU: CPU run, preset {args.preset}, float32 (issue 7 item 2); "
              "the GPU figure (item 1) needs a CUDA device.")
    overrides = {"vocab_size": args.vocab} if args.vocab else {}
    cfg = beit3_preset(args.preset, checkpoint_activations=args.checkpoint, **overrides)

    torch.manual_seed(args.seed)
    with torch.device(device):
        ours = pretrain_task(BEiT3(cfg), VISUAL_VOCAB)
    batch = pair_batch(cfg, args.batch, args.text_len, VISUAL_VOCAB, not args.no_padding, args.seed)
    masks = ours.masker(batch, generator=args.seed)
    batch, masks = batch.to(device), masks.to(device)
    trainers, gap = [Trainer("ours", ours, device)], None
    if not args.no_torchscale:
        theirs = torchscale_task(ours, device)
        gap = parity_gap(ours, theirs, batch, masks)
        trainers.append(Trainer("torchscale", theirs, device))
    if args.compile != "off":
        for layer in ours.model.layers:
            layer.compile(dynamic=args.compile == "dynamic")

    peak, peak_dtype = matmul_peak(device)
    flops = train_flops(cfg, batch, masks, ours.heads.text.proj.out_features, VISUAL_VOCAB)
    per_round = max(1, -(-args.steps // args.rounds))
    ratios = interleaved(trainers, batch, masks, args.warmup, args.rounds, per_round)
    result = _report(args, cfg, device, trainers, flops, peak, peak_dtype, ratios, gap)
    result["seconds"] = time.perf_counter() - started
    print(f"total {result['seconds']:.0f} s")
    return result


def _report(args, cfg, device, trainers, flops, peak, peak_dtype, ratios, gap) -> dict:
    impls = {}
    for t in trainers:
        sps = t.samples_per_s
        achieved = sps * flops / args.batch
        impls[t.name] = dict(samples_per_s=sps, tflops=achieved / 1e12, mfu=achieved / peak,
                             peak_mem_bytes=t.peak_bytes or None, steps=sum(t.samples) // args.batch)
    result = dict(device=device.type, device_name=device_name(device), preset=args.preset, batch=args.batch,
                  image_tokens=1 + cfg.num_patches, text_tokens=args.text_len, vocab=cfg.vocab_size,
                  dtype="bf16 autocast" if device.type == "cuda" else "float32", compile=args.compile,
                  checkpoint=args.checkpoint, padded=not args.no_padding, peak_flops=peak,
                  peak_dtype=peak_dtype, flops_per_sample=flops / args.batch, impls=impls,
                  parity_loss_gap=gap, ratio_rounds=ratios)
    if "torchscale" in impls:
        ours, theirs = trainers
        result["ratio"] = impls["ours"]["samples_per_s"] / impls["torchscale"]["samples_per_s"]
        result["ratio_median"] = median(ratios)
        result["ratio_best"] = min(theirs.seconds) / min(ours.seconds)  # fastest round of each
        result["ratio_cpu_time"] = sum(theirs.cpu_seconds) / sum(ours.cpu_seconds)

    print(f"BEiT-3 pretraining step on image-text pairs: preset {args.preset}, batch {args.batch}, "
          f"{result['image_tokens']} image + {args.text_len} text tokens"
          f"{' (padded captions)' if result['padded'] else ''}, {result['dtype']}, "
          f"{result['device_name']}; ours: compile={args.compile}, checkpoint={args.checkpoint}")
    print(f"matmul peak ({peak_dtype}, measured): {peak / 1e12:.2f} TFLOP/s; "
          f"training FLOPs per sample: {result['flops_per_sample'] / 1e9:.2f} G")
    rows = [[name, f"{v['samples_per_s']:.1f}", f"{v['tflops']:.2f}", f"{100 * v['mfu']:.1f}%",
             fmt_bytes(v["peak_mem_bytes"]), str(v["steps"])] for name, v in impls.items()]
    print_table(["impl", "samples/s", "TFLOP/s", "MFU", "peak mem", "steps"], rows)
    if device.type == "cpu":
        print(f"process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB "
              "(peak memory per model is measured on CUDA only)")
    if "ratio" in result:
        print(f"ours / torchscale samples/s: {result['ratio']:.2f}x (median of {len(ratios)} interleaved rounds "
              f"{result['ratio_median']:.2f}x, fastest rounds {result['ratio_best']:.2f}x"
              + (f", process CPU time {result['ratio_cpu_time']:.2f}x" if device.type == "cpu" else "")
              + f"); float32 parity |loss gap| {gap:.1e}")
        print("per-round ratios: " + " ".join(f"{r:.2f}" for r in ratios))
    return result


if __name__ == "__main__":
    main()
