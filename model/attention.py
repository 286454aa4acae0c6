"""Multiway self-attention through scaled_dot_product_attention.

Released variant: per-modality pre-LN + fused q/k/v projection, and
per-modality sub-LN (``inner_attn_ln``) + output projection. Paper variant:
one shared copy of each. Attention itself always runs jointly over the whole
sequence.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from model.config import BEiT3Config
from model.multiway import Multiway, routed


def _qkv_in(cfg: BEiT3Config) -> nn.Sequential:
    """(B, T, D) -> (B, T, 3D): pre-LN then q, k, v projections fused in one matmul."""
    return nn.Sequential(OrderedDict(
        norm=nn.LayerNorm(cfg.dim, eps=cfg.layernorm_eps),
        proj=nn.Linear(cfg.dim, 3 * cfg.dim),
    ))


def _attn_out(cfg: BEiT3Config) -> nn.Sequential:
    """(B, T, D) -> (B, T, D): sub-LN over the attention output, then out_proj."""
    return nn.Sequential(OrderedDict(
        norm=nn.LayerNorm(cfg.dim, eps=cfg.layernorm_eps),
        proj=nn.Linear(cfg.dim, cfg.dim),
    ))


class MultiwayAttention(nn.Module):
    """Pre-LN self-attention sub-layer (without the residual add)."""

    def __init__(self, cfg: BEiT3Config, shared: bool):
        super().__init__()
        self.num_heads = cfg.num_heads
        if shared:
            self.qkv = _qkv_in(cfg)
            self.out = _attn_out(cfg)
        else:
            self.qkv = Multiway(_qkv_in(cfg), _qkv_in(cfg))
            self.out = Multiway(_attn_out(cfg), _attn_out(cfg))

    def forward(self, x: torch.Tensor, split: int,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D), attn_mask (B, 1, 1, T) bool True = may attend, or None -> (B, T, D)."""
        B, T, D = x.shape
        qkv = routed(self.qkv, x, split)  # (B, T, 3D)
        q, k, v = qkv.view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        # (B, H, T, hd) each; SDPA's default scale head_dim**-0.5 equals the
        # official q *= scaling (applied after the q bias)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        y = y.transpose(1, 2).reshape(B, T, D)
        return routed(self.out, y, split)
