"""Pretraining heads: project hidden states at masked positions only to vocabulary logits.

Gathering the masked rows before the projection is what makes the heads cheap: the text head
is dim x 64010, so projecting every position would cost about 1 / 0.15 times more (15% text
masking) in the largest matmul of the step and in its logits memory.

Bias: off by default. The issue's reference counts (base 276.4M, large 746.6M with both
heads) are backbone + dim*64010 + dim*8192 exactly; with biases they would be 276.5M/746.7M.
"""
from __future__ import annotations

import torch
from torch import nn


class MaskedPredictionHead(nn.Module):
    """Linear(dim, vocab) applied to hidden[positions] only."""

    def __init__(self, dim: int, vocab_size: int, bias: bool = False):
        super().__init__()
        self.proj = nn.Linear(dim, vocab_size, bias=bias)
        nn.init.trunc_normal_(self.proj.weight, std=0.02, a=-0.04, b=0.04)  # as the backbone

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D), positions (B, T) bool -> logits (M, V), M = positions.sum(),
        rows in row-major order of positions (matching targets[positions])."""
        if positions.shape != hidden.shape[:2]:
            raise ValueError(f"positions {tuple(positions.shape)} do not match hidden {tuple(hidden.shape[:2])}")
        return self.proj(hidden[positions])  # (M, D) -> (M, V)


class PretrainHeads(nn.Module):
    """The two heads of masked data modeling: text (MLM) over the text vocabulary and image
    (MIM) over the visual-tokenizer codebook."""

    def __init__(self, dim: int, text_vocab_size: int, visual_vocab_size: int, bias: bool = False):
        super().__init__()
        self.text = MaskedPredictionHead(dim, text_vocab_size, bias)
        self.image = MaskedPredictionHead(dim, visual_vocab_size, bias)
