"""Optimizer pieces shared by pretraining and fine-tuning: BEiT's weight-decay groups
and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch

# Parameters named like these are never decayed (with every 1-D parameter: biases, norms).
NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "logit_scale")


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for biases, norms, tokens and position tables (BEiT's rule)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or any(n in name for n in NO_DECAY_NAMES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, steps: int, warmup: int, peak: float = 1.0, floor: float = 0.0) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine down to ``floor`` at ``steps``."""
    floor = min(floor, peak)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))
