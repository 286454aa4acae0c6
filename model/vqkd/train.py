"""Training a VQ-KD tokenizer, and measuring what its codes carry.

Recipe (BEiT v2 plus what made the tiny demo work, DESIGN §4/§7):
- the decoder reconstructs frozen teacher features; loss = weighted mean of
  1 - cos(decoded, teacher) + beta * |sg(z_q) - z|^2 (commitment);
- straight-through estimator z + sg(z_q - z);
- the codebook is not learned by SGD: rows are an EMA (decay 0.99) of the
  l2-normalised mean of the vectors assigned to them, re-normalised (the
  reference's NormEMAVectorQuantizer);
- the first ``warmup_steps`` steps train encoder + decoder with no quantizer
  (k-means at step 0 of a random encoder collapses every output to one code);
  then cosine k-means on the current features initialises the codebook;
- a code unused for ``dead_code_steps`` steps is restarted on a current vector,
  preferring vectors far from their code (the usual EMA-size threshold never
  fires in short runs);
- AdamW (betas 0.9, 0.99) decaying weight matrices only (not biases, norms, cls_token,
  pos_embed), as the reference does.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from model.optim import param_groups
from model.vqkd import VQKD


@dataclass(frozen=True)
class VQKDTrainConfig:
    steps: int = 600
    lr: float = 2e-3
    weight_decay: float = 1e-4
    lr_warmup_steps: int = 20
    warmup_steps: int = 100  # quantizer-free steps before k-means
    kmeans_iters: int = 10
    dead_code_steps: int = 20
    beta: float = 1.0  # commitment weight (reference: 1.0)
    decay: float = 0.99
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.steps <= 0 or self.lr <= 0:
            raise ValueError("VQKDTrainConfig: steps and lr must be > 0")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"VQKDTrainConfig: warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"VQKDTrainConfig: decay must be in (0, 1), got {self.decay}")
        if self.dead_code_steps <= 0 or self.kmeans_iters <= 0:
            raise ValueError("VQKDTrainConfig: dead_code_steps and kmeans_iters must be > 0")


# ---------------------------------------------------------------- codebook maintenance

def kmeans_cosine(samples: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Spherical k-means of l2-normalised samples (M, C) -> centres (k, C).

    k-means++ seeding (cosine distance): on simple scenes most patches are flat
    background with near-identical features, and uniformly drawn seeds would
    spend most of the codebook on them. An empty cluster is re-seeded on the
    sample worst served by its centre.
    """
    means = _kmeans_pp_seeds(samples, k, generator)
    for _ in range(iters):
        sims = samples @ means.t()  # (M, k)
        best, assign = sims.max(dim=1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(means).index_add_(0, assign, samples)
        new = F.normalize(sums, dim=1)
        empty = counts == 0
        if empty.any():
            n_empty = int(empty.sum())
            new[empty] = samples[torch.argsort(best)[:n_empty]]
        means = new
    return means


def _kmeans_pp_seeds(samples: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    M = samples.shape[0]
    if M <= k:  # too few samples for distinct seeds: take all, then draw with replacement
        extra = torch.randint(0, M, (k - M,), generator=generator, device=samples.device)
        return samples[torch.cat((torch.arange(M, device=samples.device), extra))].clone()
    first = torch.randint(0, M, (1,), generator=generator, device=samples.device)
    chosen = [int(first)]
    dist = (1 - samples @ samples[first[0]]).clamp_min(0)  # (M,) distance to the nearest seed
    for _ in range(k - 1):
        weights = dist.square()
        if float(weights.sum()) <= 0:  # every sample coincides with a seed
            j = int(torch.randint(0, M, (1,), generator=generator, device=samples.device))
        else:
            j = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(j)
        dist = torch.minimum(dist, (1 - samples @ samples[j]).clamp_min(0))
    return samples[torch.tensor(chosen, device=samples.device)].clone()


@torch.no_grad()
def init_codebook(model: VQKD, z: torch.Tensor, iters: int, generator: torch.Generator) -> None:
    """k-means the flattened vectors z (M, C) into the codebook; mark it initted."""
    emb = model.quantize.embedding
    centres = kmeans_cosine(z, emb.weight.shape[0], iters, generator)
    emb.weight.copy_(centres)
    emb.embed_avg.copy_(centres)
    counts = torch.bincount(model.quantize.nearest(z), minlength=emb.weight.shape[0]).float()
    emb.cluster_size.copy_(counts)
    model.quantize.cluster_size.copy_(counts)
    emb.initted.fill_(1.0)


@torch.no_grad()
def ema_update(model: VQKD, z: torch.Tensor, idx: torch.Tensor, decay: float) -> torch.Tensor:
    """Reference NormEMA step for vectors z (M, C) assigned to codes idx (M,); returns counts (K,)."""
    q = model.quantize
    weight = q.embedding.weight
    bins = torch.bincount(idx, minlength=weight.shape[0]).to(z.dtype)
    q.cluster_size.mul_(decay).add_(bins, alpha=1 - decay)
    sums = torch.zeros_like(weight).index_add_(0, idx, z)
    means = F.normalize(sums / bins.clamp_min(1).unsqueeze(1), dim=1)
    means = torch.where((bins == 0).unsqueeze(1), weight, means)
    weight.mul_(decay).add_(means, alpha=1 - decay)
    weight.copy_(F.normalize(weight, dim=1))
    return bins


@torch.no_grad()
def restart_dead_codes(model: VQKD, z: torch.Tensor, idx: torch.Tensor, dead: torch.Tensor,
                       generator: torch.Generator) -> int:
    """Move dead codes (bool (K,)) onto vectors of z (M, C), sampled by their distance to their code."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0
    weight = model.quantize.embedding.weight
    dist = (1 - (z * weight[idx]).sum(dim=1)).clamp_min(0) + 1e-6  # (M,)
    n = min(n_dead, z.shape[0])
    picks = torch.multinomial(dist, n, replacement=False, generator=generator)
    rows = dead.nonzero().squeeze(1)[:n]
    weight[rows] = z[picks]
    model.quantize.embedding.embed_avg[rows] = z[picks]
    return n


# ---------------------------------------------------------------- metrics on codes

def code_usage(codes: torch.Tensor, n_codes: int) -> dict[str, float]:
    """Codes (any shape) -> fraction of the codebook used and perplexity (exp entropy)."""
    counts = torch.bincount(codes.reshape(-1).long(), minlength=n_codes).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"utilisation": float((counts > 0).double().mean()), "perplexity": float(entropy.exp())}


def code_histograms(codes: torch.Tensor, n_codes: int) -> torch.Tensor:
    """Codes (B, N) -> per-image normalised histograms (B, n_codes)."""
    B, N = codes.shape
    hist = torch.zeros(B, n_codes).scatter_add_(1, codes.long(), torch.ones(B, N))
    return hist / N


# ---------------------------------------------------------------- the loop

def reconstruction_loss(rec: torch.Tensor, target: torch.Tensor,
                        weights: torch.Tensor | None) -> torch.Tensor:
    """(B, N, D) x2, optional (B, N) weights -> weighted mean of 1 - cos."""
    per_patch = 1 - F.cosine_similarity(rec.float(), target.float(), dim=-1, eps=1e-6)
    if weights is None:
        return per_patch.mean()
    return (per_patch * weights).sum() / weights.sum().clamp_min(1e-6)


@torch.no_grad()
def precompute_targets(teacher: torch.nn.Module, images: torch.Tensor,
                       chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher outputs for every image once: uint8 or [0, 1] float (M, 3, S, S) ->
    (targets float16 (M, N, D), weights (M, N) or None). Worth it when the teacher
    is deterministic and the images are not augmented (a HOG teacher is a large share of
    a tiny model's step)."""
    targets, weights = [], []
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk]
        t, w = teacher(x.float().div(255) if x.dtype == torch.uint8 else x)
        targets.append(t.half())
        weights.append(w)
    return torch.cat(targets), (None if weights[0] is None else torch.cat(weights))


def train_vqkd(model: VQKD, teacher: torch.nn.Module | None, batches: Iterator,
               cfg: VQKDTrainConfig,
               on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Train ``model`` in place; returns per-step logs.

    ``batches`` yields images (B, 3, S, S) in [0, 1], passed through ``teacher``,
    or tuples (images, targets (B, N, D), weights (B, N) or None) of precomputed
    teacher outputs (``precompute_targets``; ``teacher`` may then be None).
    Each log: step, loss, rec_loss, commit_loss, lr, and after warm-up the batch's
    ``utilisation`` (fraction of codes used), ``perplexity`` and ``restarted`` codes.
    """
    if teacher is not None and getattr(teacher, "dim", model.config.out_dim) != model.config.out_dim:
        raise ValueError(f"teacher dim {teacher.dim} != VQ-KD out_dim {model.config.out_dim}")
    device = model.encoder.pos_embed.device
    teacher = teacher.to(device) if teacher is not None else None
    gen = torch.Generator(device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    # The reference's decay rule (optim_factory + VQKD.no_weight_decay): none on 1-D
    # parameters (biases, norms, q/v biases) nor on encoder/decoder cls_token and pos_embed.
    # BEiT's rule is the same on these names; the codebook, the reference's other skipped
    # name, has no gradient (EMA-updated) and is in no group.
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    K = model.quantize.n_codes
    last_used = torch.zeros(K, dtype=torch.long, device=device)
    model.train()
    logs, start = [], time.perf_counter()
    for step in range(cfg.steps):
        x, target, weights = _batch(next(batches), teacher, device)
        z = model.encode(x)  # (B, N, C)
        B, N, C = z.shape
        log = {"step": step, "lr": opt.param_groups[0]["lr"]}
        if step < cfg.warmup_steps:
            z_q, commit = z, z.new_zeros(())
        else:
            flat = z.detach().reshape(B * N, C)
            if not bool(model.quantize.embedding.initted):  # first quantized step
                init_codebook(model, flat, cfg.kmeans_iters, gen)
                last_used.fill_(step)
            idx = model.quantize.nearest(flat)
            hard = model.quantize.embedding.weight[idx].view(B, N, C)  # before this step's EMA
            bins = ema_update(model, flat, idx, cfg.decay)
            last_used[bins > 0] = step
            dead = (step - last_used) >= cfg.dead_code_steps
            log["restarted"] = restart_dead_codes(model, flat, idx, dead, gen)
            last_used[dead] = step
            commit = cfg.beta * F.mse_loss(hard, z)
            z_q = z + (hard - z).detach()  # straight-through
            log.update(code_usage(idx, K))
        rec_loss = reconstruction_loss(model.decode(z_q), target, weights)
        loss = rec_loss + commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        log.update(loss=loss.item(), rec_loss=rec_loss.item(), commit_loss=commit.item(),
                   seconds=time.perf_counter() - start)
        logs.append(log)
        if on_step is not None:
            on_step(log)
    model.eval()
    return logs


def _batch(batch, teacher, device):
    """-> (images, float targets, weights or None) on ``device``."""
    if isinstance(batch, (tuple, list)):
        x, target, weights = batch
        x, target = x.to(device, non_blocking=True), target.to(device, non_blocking=True).float()
        return x, target, (None if weights is None else weights.to(device, non_blocking=True))
    if teacher is None:
        raise ValueError("train_vqkd: batches of bare images need a teacher")
    x = batch.to(device, non_blocking=True)
    return (x, *teacher(x))


def _lr_factor(step: int, cfg: VQKDTrainConfig) -> float:
    if step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    progress = (step - cfg.lr_warmup_steps) / max(1, cfg.steps - cfg.lr_warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


__all__ = ["VQKDTrainConfig", "train_vqkd", "precompute_targets", "kmeans_cosine", "init_codebook", "ema_update",
           "restart_dead_codes", "code_usage", "code_histograms", "reconstruction_loss"]
