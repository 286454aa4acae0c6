"""OpenAI CLIP's visual transformer, as BEiT v2's VQ-KD teacher sees it.

Module names are those of ``clip.model.VisionTransformer``, so its state dict loads
as is: ``conv1.weight`` (no bias), ``class_embedding``, ``positional_embedding``,
``ln_pre.*``, ``transformer.resblocks.{i}.{ln_1, attn.in_proj_weight, attn.in_proj_bias,
attn.out_proj.*, ln_2, mlp.c_fc.*, mlp.c_proj.*}``, ``ln_post.*``, ``proj``.
The forward returns BEiT v2's regression targets: every patch token after ``ln_post``,
projected by ``proj`` (512-d for ViT-B/16), the cls token dropped.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from model.vqkd import load_strict
from model.vqkd.vit import fused_attention

CLIP_LN_EPS = 1e-5  # CLIP uses torch's default LayerNorm eps


class QuickGELU(nn.Module):
    """CLIP's activation, x * sigmoid(1.702 x): the weights were trained with it, not GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ClipAttention(nn.Module):
    """nn.MultiheadAttention's parameters (fused in_proj with bias, out_proj), batch first."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        return fused_attention(x, self.in_proj_weight, self.in_proj_bias, self.heads, self.out_proj)


class ClipMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=CLIP_LN_EPS)
        self.attn = ClipAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=CLIP_LN_EPS)
        self.mlp = ClipMlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, hidden: int):
        super().__init__()
        self.resblocks = nn.Sequential(*(ResidualAttentionBlock(dim, heads, hidden) for _ in range(depth)))

    def forward(self, x):
        return self.resblocks(x)


class ClipVisual(nn.Module):
    """CLIP ViT image tower whose output is the per-patch targets (B, N, output_dim)."""

    def __init__(self, image_size: int, patch_size: int, dim: int, depth: int, heads: int,
                 output_dim: int, hidden: int | None = None):
        super().__init__()
        self.image_size = image_size
        num_patches = (image_size // patch_size) ** 2
        scale = dim ** -0.5
        self.conv1 = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(dim))
        self.positional_embedding = nn.Parameter(scale * torch.randn(num_patches + 1, dim))
        self.ln_pre = nn.LayerNorm(dim, eps=CLIP_LN_EPS)
        self.transformer = Transformer(dim, depth, heads, hidden or 4 * dim)
        self.ln_post = nn.LayerNorm(dim, eps=CLIP_LN_EPS)
        self.proj = nn.Parameter(scale * torch.randn(dim, output_dim))

    @property
    def output_dim(self) -> int:
        return self.proj.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> ln_post(patch tokens) @ proj, (B, N, output_dim)."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"CLIP teacher: expected {self.image_size}x{self.image_size} input, "
                             f"got {tuple(x.shape[-2:])}")
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major patches
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat((cls, x), dim=1) + self.positional_embedding.to(x.dtype))
        x = self.transformer(x)
        return self.ln_post(x[:, 1:]) @ self.proj  # LN is per token: same as on all, then drop cls


def clip_visual_from_state(state: dict[str, torch.Tensor], num_heads: int | None = None) -> ClipVisual:
    """ClipVisual (eval, float32) from an OpenAI CLIP state dict: the image tower's keys,
    bare or under ``visual.`` in a whole CLIP checkpoint (text-tower keys are ignored).
    The architecture is read off the shapes; heads default to width / 64 (every CLIP ViT)."""
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    needed = ("conv1.weight", "class_embedding", "positional_embedding", "proj")
    if any(k not in state for k in needed):
        raise ValueError(f"not an OpenAI CLIP ViT state dict: needs {', '.join(needed)} "
                         f"(optionally under 'visual.'); found e.g. {sorted(state)[:8]}")
    conv = state["conv1.weight"]  # (width, 3, patch, patch)
    dim, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(state["positional_embedding"].shape[0] - 1)
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks."))
    hidden = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    net = ClipVisual(grid * patch, patch, dim, depth, num_heads or max(1, dim // 64),
                     state["proj"].shape[1], hidden)
    load_strict(net, {k: v.float() for k, v in state.items()}, source="CLIP teacher")
    return net.eval()


__all__ = ["ClipVisual", "QuickGELU", "clip_visual_from_state"]
