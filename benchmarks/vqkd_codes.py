"""VQ-KD ``codes()`` throughput vs the bare encoder forward of the same model (target >= 0.9x).

    python -m benchmarks.vqkd_codes [--preset tiny|official-base] [--batch 64] [--repeats 7]
                                    [--threads 2] [--device cpu|cuda] [--bf16] [--channels-last]

Side by side in one run, on the same random images and the same model (random
weights, a random unit codebook):

- encoder: ``model.encoder(x * 255 / 127.5 - 1)`` under inference mode: the ViT alone;
- codes:   ``model.codes(x)``: the same encoder, then the float32 task layer,
  l2-normalisation and the nearest-code search - everything a tokenize actor runs.

Runs are interleaved (encoder, codes, encoder, ...) and each rate is the median,
so load that comes and goes on a shared machine hits both alike.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from model.vqkd import VQKD, vqkd_preset


def build(preset: str, device: torch.device) -> VQKD:
    torch.manual_seed(0)
    model = VQKD(vqkd_preset(preset)).eval()
    with torch.no_grad():
        emb = model.quantize.embedding
        emb.weight.copy_(F.normalize(torch.randn_like(emb.weight), dim=1))
    return model.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def run(preset: str, batch: int, repeats: int, device: torch.device, bf16: bool,
        channels_last: bool) -> dict:
    model = build(preset, device)
    x = torch.rand(batch, 3, model.config.image_size, model.config.image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if bf16 else None

    def encoder():
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            model.encoder(x * 255.0 / 127.5 - 1.0)

    def codes():
        model.codes(x, autocast_dtype=dtype, channels_last=channels_last)

    encoder(), codes()  # warm-up: allocator, kernels, thread pools
    times = {"encoder": [], "codes": []}
    for _ in range(repeats):
        times["encoder"].append(timed(encoder, device))
        times["codes"].append(timed(codes, device))
    rate = {k: batch / statistics.median(v) for k, v in times.items()}
    return {"preset": preset, "tokens": model.config.num_patches, "batch": batch,
            "encoder": rate["encoder"], "codes": rate["codes"], "ratio": rate["codes"] / rate["encoder"]}


def main(argv=None) -> list[dict]:
    """Run the benchmark, print its table, return its rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", choices=["tiny", "official-base"],
                        help="repeatable; default: tiny")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 tiny, 8 official-base (CPU)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} threads"
    print(f"VQ-KD codes() vs bare encoder forward ({where}, {'bf16' if args.bf16 else 'fp32'}"
          f"{', channels-last' if args.channels_last else ''}; median of {args.repeats} interleaved runs)")
    print(f"{'preset':<14}{'codes/img':>10}{'batch':>7}{'encoder img/s':>15}{'codes img/s':>13}{'ratio':>8}")
    rows = []
    for preset in args.preset or ["tiny"]:
        default_batch = 256 if device.type == "cuda" else (64 if preset == "tiny" else 8)
        r = run(preset, args.batch or default_batch, args.repeats, device, args.bf16, args.channels_last)
        r.update(device_name=where, dtype="bf16" if args.bf16 else "fp32")
        rows.append(r)
        print(f"{r['preset']:<14}{r['tokens']:>10}{r['batch']:>7}{r['encoder']:>15.1f}"
              f"{r['codes']:>13.1f}{r['ratio']:>8.3f}")
    print("target: ratio >= 0.9 (the task layer and nearest-code search add <= 10%)")
    return rows


if __name__ == "__main__":
    main()
