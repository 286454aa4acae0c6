"""A small CLIP trained on the corpus's own image-caption pairs: the VQ-KD teacher where no
released CLIP can be loaded (the demo trains everything itself).

BEiT v2 distils OpenAI CLIP's patch tokens so that the visual codes carry what captions
name (objects, shapes), not only colour and texture; a hand-made teacher (HOG, colours)
cannot. This model is trained the way CLIP is (symmetric InfoNCE between an image and a
caption embedding) and its per-patch image features are the targets, as CLIP's are.
The image tower is convolutional: on a few thousand pairs a ViT tower of the same cost
learns colour and size but hardly shape (benchmarks/RESULTS.md, demo pretraining).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from model.optim import param_groups, warmup_cosine


@dataclass(frozen=True)
class CorpusClipTrainConfig:
    steps: int = 600
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    width: int = 128          # image and caption embedding width = the teacher's target width
    text_depth: int = 2
    max_caption_tokens: int = 48  # captions are cut to this (incl. <s> </s>)

    def __post_init__(self):
        for name in ("steps", "batch_size", "width", "text_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"corpus_clip.{name}: must be >= 1")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError("corpus_clip.warmup_steps: must be in [0, steps)")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("corpus_clip.lr must be > 0 and weight_decay >= 0")
        if self.max_caption_tokens < 3:
            raise ValueError("corpus_clip.max_caption_tokens: must be >= 3 (<s>, a piece, </s>)")


class ConvImageTower(nn.Module):
    """Images (B, 3, S, S), normalised -> patch features (B, (S / patch)^2, width), row-major.

    log2(patch_size) stages, each a stride-2 conv and a 3x3 conv (BatchNorm, GELU), widening
    linearly to ``width``, then a 1x1 projection: one output position per patch, like a ViT's
    patch tokens."""

    def __init__(self, patch_size: int = 16, width: int = 128):
        super().__init__()
        stages = int(math.log2(patch_size))
        if 2 ** stages != patch_size:
            raise ValueError(f"ConvImageTower: patch_size must be a power of 2, got {patch_size}")
        channels = [3] + [max(8, round(width * (i + 1) / stages)) for i in range(stages)]
        layers = []
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.GELU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.GELU()]
        self.stages = nn.Sequential(*layers)
        self.proj = nn.Conv2d(channels[-1], width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stages(x)).flatten(2).transpose(1, 2)


class CaptionTower(nn.Module):
    """Token ids (B, L), padded with ``pad_id`` -> caption embeddings (B, width): a pre-LN
    transformer that never attends to padding, mean over the non-pad positions, a projection."""

    def __init__(self, vocab_size: int, max_len: int, width: int, depth: int, pad_id: int):
        super().__init__()
        self.pad_id = pad_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(max_len, width))
        layer = nn.TransformerEncoderLayer(width, max(1, width // 64), 4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == self.pad_id  # (B, L)
        h = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        h = self.ln_final(self.transformer(h, src_key_padding_mask=pad))  # (B, L, W)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.proj((h * keep).sum(1) / keep.sum(1).clamp_min(1))


class CorpusClip(nn.Module):
    def __init__(self, image: ConvImageTower, text: CaptionTower):
        super().__init__()
        self.image, self.text = image, text
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, width): the mean of the patch features, so every patch's feature
        is trained to say what it shows (these are the VQ-KD targets)."""
        return self.image(x).mean(1)

    def loss(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over the batch: the i-th image and i-th caption belong together."""
        a = F.normalize(self.image_embedding(x), dim=-1)
        b = F.normalize(self.text(ids), dim=-1)
        logits = self.logit_scale.exp().clamp(max=100) * a @ b.T  # (B, B)
        target = torch.arange(len(x), device=x.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_corpus_clip(model: CorpusClip, batches: Iterator, cfg: CorpusClipTrainConfig,
                      on_step=None) -> list[dict]:
    """AdamW (BEiT's decay groups) with warmup + cosine over ``cfg.steps`` batches of
    (normalised images (B, 3, S, S), caption ids (B, L)); returns per-step logs."""
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    model.train()
    history = []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        x, ids = next(batches)
        loss = model.loss(x, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log = {"step": step, "loss": loss.item()}
        history.append(log)
        if on_step:
            on_step(log)
    model.eval()
    return history


__all__ = ["CorpusClipTrainConfig", "ConvImageTower", "CaptionTower", "CorpusClip", "train_corpus_clip"]
