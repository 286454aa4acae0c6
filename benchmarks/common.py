"""Shared pieces of the training-throughput benchmarks: the workload, FLOP counting, the
measured matmul peak, the timed training step and interleaved timing.

FLOP counting (``train_flops``), the PaLM-paper MFU convention: a training step costs 3x
its forward (backward = 2x forward), and the forward counts the matmuls the model actually
executes (padding included, since it is computed):

    per sample, T = 1 + N + L tokens (vision cls + N patches + L text), depth layers, width D:
      backbone  2 * T * P_tok        P_tok = depth * (4 D^2 + 2 D F [+ VL-expert same size])
                                     = the weights ONE token passes through: q,k,v,out (4 D^2)
                                     and fc1, fc2 (2 D F) of the expert it is routed to; a
                                     multiway layer holds 2-3 experts but each token uses one
      attention 4 * depth * T^2 * D  (Q K^T and P V)
      patches   2 * N * (C p^2) * D  (the conv patch projection)
    per step, the heads at masked positions only:
      heads     2 * D * (V_text * M_text + V_image * M_image)
    training FLOPs = 3 x the sum, i.e. the familiar 6 * params * tokens + 12 * depth * T^2 * D
    (+ heads), except the patch projection: 2 x (its input, the pixels, needs no gradient).
    Biases, norms, softmax and the optimizer are not counted. With the math SDPA backend this
    equals torch.utils.flop_counter.FlopCounterMode's count of a real step exactly (tested).

MFU = training FLOPs per second / the bf16 (GPU) or float32 (CPU) matmul peak this process
measures with a large torch.matmul loop (``matmul_peak``), not the data-sheet number.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from model.batch import MixedBatch, PairPart
from model.config import BEiT3Config
from model.masking import TextMask
from model.optim import param_groups
from model.task import PretrainMasks, PretrainTask

BOS, PAD, EOS = 0, 1, 2  # XLM-R ids used by the official tokenizer (DESIGN section 3)
SPECIAL_IDS = (0, 1, 2, 3)


def pick_device(name: str | None = None) -> torch.device:
    """cuda when present (or `name` if given), else cpu."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- workload

def pair_batch(cfg: BEiT3Config, batch_size: int, text_len: int, visual_vocab: int,
               padded: bool, seed: int) -> MixedBatch:
    """A MixedBatch of image-text pairs on the CPU (move it with .to(device)).

    pixels (B, 3, S, S) in [-1, 1]; visual_tokens (B, N); ids (B, text_len) = <s> words </s>
    then <pad>; padded=True draws caption lengths uniformly in [text_len // 2, text_len] (so
    the padding mask is exercised), else every caption fills text_len.
    """
    gen = torch.Generator().manual_seed(seed)
    size, n = cfg.image_size, cfg.num_patches
    pixels = torch.rand(batch_size, 3, size, size, generator=gen) * 2 - 1
    codes = torch.randint(0, visual_vocab, (batch_size, n), generator=gen)
    ids = torch.randint(len(SPECIAL_IDS), cfg.vocab_size - 1, (batch_size, text_len), generator=gen)
    if padded:
        lengths = torch.randint(max(text_len // 2, 3), text_len + 1, (batch_size,), generator=gen)
    else:
        lengths = torch.full((batch_size,), text_len)
    positions = torch.arange(text_len)[None, :]
    ids[:, 0] = BOS
    ids[positions == (lengths[:, None] - 1)] = EOS
    padding = positions >= lengths[:, None]
    ids[padding] = PAD
    return MixedBatch(pair=PairPart(pixels, codes, ids, padding))


def first_samples(batch: MixedBatch, masks: PretrainMasks, k: int) -> tuple[MixedBatch, PretrainMasks]:
    """The first k pairs of a pair-only batch and their masks (for the parity check)."""
    p = batch.pair
    part = PairPart(p.pixels[:k], p.visual_tokens[:k], p.ids[:k], p.padding_mask[:k])
    text = TextMask(masks.pair_text.input_ids[:k], masks.pair_text.selected[:k])
    image = None if masks.pair_image is None else masks.pair_image[:k]
    return MixedBatch(pair=part), PretrainMasks(pair_text=text, pair_image=image)


def pretrain_task(backbone: torch.nn.Module, visual_vocab: int) -> PretrainTask:
    """PretrainTask over the backbone's whole text vocabulary; the last id serves as [MASK]."""
    vocab = backbone.config.vocab_size
    return PretrainTask(backbone, vocab, visual_vocab, special_ids=SPECIAL_IDS, mask_id=vocab - 1)


# ----------------------------------------------------------------------------- FLOPs

def active_params_per_token(cfg: BEiT3Config) -> int:
    """Matmul weights one token passes through in the backbone (its expert only)."""
    return cfg.depth * (4 * cfg.dim**2 + 2 * cfg.dim * cfg.ffn_dim)


def train_flops(cfg: BEiT3Config, batch: MixedBatch, masks: PretrainMasks,
                text_vocab: int, visual_vocab: int) -> float:
    """Training FLOPs of one step on a pair-only batch (formula in the module docstring)."""
    part = batch.pair
    b, n, length = part.batch_size, cfg.num_patches, part.ids.shape[1]
    tokens = 1 + n + length
    backbone = 2 * tokens * active_params_per_token(cfg)
    attention = 4 * cfg.depth * tokens**2 * cfg.dim
    patches = 2 * n * cfg.in_chans * cfg.patch_size**2 * cfg.dim
    m_text = int(masks.pair_text.selected.sum())
    m_image = 0 if masks.pair_image is None else int(masks.pair_image.sum())
    heads = 2 * cfg.dim * (text_vocab * m_text + visual_vocab * m_image)
    return 3.0 * (b * (backbone + attention) + heads) + 2.0 * b * patches


def matmul_peak(device: torch.device, seconds: float = 2.0) -> tuple[float, str]:
    """(FLOP/s, dtype name) of a square torch.matmul loop: bf16 8192^2 on GPU, fp32 1024^2 on CPU."""
    dtype, size = (torch.bfloat16, 8192) if device.type == "cuda" else (torch.float32, 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    synchronize(device)
    iters, elapsed = 0, 0.0
    batch = 10 if device.type == "cuda" else 1
    start = time.perf_counter()
    while elapsed < seconds:
        for _ in range(batch):
            torch.matmul(a, b, out=out)
        synchronize(device)
        iters += batch
        elapsed = time.perf_counter() - start
    return 2.0 * size**3 * iters / elapsed, str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- training step

def autocast_for(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on GPU, as pipelines.pretrain.loop does; float32 on the CPU."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def adamw(task: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of pipelines.pretrain.loop (paper recipe: betas (0.9, 0.98), eps 1e-6, wd 0.05)."""
    return torch.optim.AdamW(param_groups(task, 0.05), lr=1e-4, betas=(0.9, 0.98), eps=1e-6)


class Trainer:
    """One model's training step, as pipelines.pretrain.loop runs it: bf16 autocast forward of
    PretrainTask with precomputed masks, backward, grad-norm clip 3.0, AdamW, zero grads."""

    def __init__(self, name: str, task: PretrainTask, device: torch.device):
        self.name, self.task, self.device = name, task, device
        self.optimizer = adamw(task)
        self.autocast = autocast_for(device)
        self.seconds: list[float] = []  # wall time per timed round
        self.cpu_seconds: list[float] = []  # this process's CPU time per round (robust on a busy CPU)
        self.samples: list[int] = []
        self.peak_bytes = 0

    def step(self, batch: MixedBatch, masks: PretrainMasks) -> torch.Tensor:
        with self.autocast():
            out = self.task(batch, masks=masks)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.task.parameters(), 3.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    def state_bytes(self) -> int:
        """Bytes of this model's persistent tensors: parameters, gradients, optimizer state."""
        tensors = [p for p in self.task.parameters()]
        tensors += [p.grad for p in self.task.parameters() if p.grad is not None]
        tensors += [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def run(self, batch: MixedBatch, masks: PretrainMasks, steps: int, timed: bool) -> None:
        """`steps` steps; when timed, record the wall time and this model's own peak memory
        (CUDA: the peak above what was allocated before, plus its own persistent state, so a
        second model resident on the same GPU is not counted)."""
        cuda = self.device.type == "cuda"
        synchronize(self.device)
        if cuda:
            base = torch.cuda.memory_allocated(self.device) - self.state_bytes()
            torch.cuda.reset_peak_memory_stats(self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step(batch, masks)
        synchronize(self.device)
        if timed:
            self.seconds.append(time.perf_counter() - start)
            self.cpu_seconds.append(time.process_time() - cpu_start)
            self.samples.append(steps * batch.num_samples)
        if cuda:
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device) - base)

    @property
    def samples_per_s(self) -> float:
        return sum(self.samples) / sum(self.seconds)


def interleaved(trainers: Sequence[Trainer], batch: MixedBatch, masks: PretrainMasks,
                warmup: int, rounds: int, steps_per_round: int) -> list[float]:
    """Warm every trainer up, then time `rounds` rounds of `steps_per_round` steps each,
    alternating the order every round so a busy machine slows all of them alike.

    Returns, per round, samples/s of trainers[0] / samples/s of trainers[1] (empty for one)."""
    for t in trainers:
        t.run(batch, masks, warmup, timed=False)
    ratios = []
    for r in range(rounds):
        order = trainers if r % 2 == 0 else list(reversed(trainers))
        for t in order:
            t.run(batch, masks, steps_per_round, timed=True)
        if len(trainers) > 1:
            ratios.append(trainers[1].seconds[-1] / trainers[0].seconds[-1])
    return ratios


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def fmt_bytes(n: float | None) -> str:
    return "n/a" if not n else f"{n / 1e9:.1f} GB"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
