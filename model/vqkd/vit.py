"""The BEiT-style ViT of BEiT v2's VQ-KD (its encoder and decoder) and of the ViT teacher.

Module names follow unilm/beit2 modeling_finetune.py, so a ``state_dict()`` has the
official keys: {cls_token, pos_embed, patch_embed.proj.*, fc_norm.*, blocks.{i}.{norm1,
norm2, attn.qkv.weight, attn.q_bias, attn.v_bias, attn.proj.*, mlp.fc1.*, mlp.fc2.*}}.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def fused_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, heads: int,
                    out: nn.Module) -> torch.Tensor:
    """(B, T, D) through one fused q/k/v projection, SDPA over ``heads``, then ``out``."""
    B, T, D = x.shape
    qkv = F.linear(x, weight, bias).reshape(B, T, 3, heads, D // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, hd)
    return out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))

class Attention(nn.Module):
    """Fused qkv weight, separate q/v biases (no k bias), scale head_dim ** -0.5."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        return fused_attention(x, self.qkv.weight, bias, self.heads, self.proj)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, C, H, W) -> (B, N, D), patches in row-major order
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """BEiT v2 VisionTransformer with use_mean_pooling: no final norm, fc_norm on patch tokens."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int, depth: int,
                 heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.image_size = image_size
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, eps) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(dim, eps=eps)
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for i, block in enumerate(self.blocks):  # the reference's fix_init_weight
            block.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> patch tokens (B, N, D) after fc_norm (cls token dropped)."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"expected {self.image_size}x{self.image_size} input, got "
                             f"{tuple(x.shape[-2:])}")
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.fc_norm(x[:, 1:])


__all__ = ["ViT", "Block", "Attention", "Mlp", "PatchEmbed"]
