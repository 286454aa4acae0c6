"""Multiway routing: per-modality experts chosen by an explicit split position.

A sequence is ``[vision cls, patches..., text tokens...]``. ``split`` is the
number of leading tokens that belong to the vision expert; it is a forward
argument (never module state), so one module serves image-only (split = T),
text-only (split = 0) and image-text (0 < split < T) batches, and
torch.compile sees a plain int.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class Multiway(nn.Module):
    """Vision/text experts (and an optional vision-language one) over one sequence.

    Children are named ``vision``, ``text`` and ``vl``; ``vl``, when present,
    takes *all* tokens of image-text inputs (the paper variant's top layers).
    """

    def __init__(self, vision: nn.Module, text: nn.Module, vl: nn.Module | None = None):
        super().__init__()
        self.vision = vision
        self.text = text
        self.vl = vl

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        """x (B, T, ...) -> (B, T, ...); tokens [0, split) vision, [split, T) text."""
        seq_len = x.shape[1]
        if split >= seq_len:
            return self.vision(x)
        if split <= 0:
            return self.text(x)
        if self.vl is not None:
            return self.vl(x)
        return torch.cat([self.vision(x[:, :split]), self.text(x[:, split:])], dim=1)


def routed(module: nn.Module, x: torch.Tensor, split: int) -> torch.Tensor:
    """Apply a Multiway module with its split, or a shared module to every token."""
    if isinstance(module, Multiway):
        return module(x, split)
    return module(x)


def ffn_expert(dim: int, ffn_dim: int, eps: float) -> nn.Sequential:
    """Pre-LN FFN expert: LN -> fc1 -> GELU -> LN over ffn_dim (subln) -> fc2.

    (B, T, dim) -> (B, T, dim). The pre-LN lives with its expert so one route
    per sub-layer suffices (the official code routes LN and FFN separately,
    which computes the same thing).
    """
    return nn.Sequential(OrderedDict(
        norm=nn.LayerNorm(dim, eps=eps),
        fc1=nn.Linear(dim, ffn_dim),
        act=nn.GELU(),
        ffn_norm=nn.LayerNorm(ffn_dim, eps=eps),
        fc2=nn.Linear(ffn_dim, dim),
    ))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a whole sample's residual branch with probability p.

    x (B, ...) -> (B, ...), survivors scaled by 1 / (1 - p).
    """
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)
