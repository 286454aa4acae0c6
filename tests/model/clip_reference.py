"""A reference OpenAI CLIP image tower for the VQ-KD teacher tests: clip/model.py's parameter
names and layout, written out independently of model/vqkd/teachers.py, with random weights."""
from __future__ import annotations

from collections import OrderedDict

import torch

# OpenAI's published CLIP preprocessing statistics, typed out independently of the code under test.
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CLIP_MEAN, CLIP_STD = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


class RefQuickGELU(torch.nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefResidualAttentionBlock(torch.nn.Module):
    """clip/model.py's block: nn.MultiheadAttention on (T, B, D), QuickGELU MLP."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(width, heads)
        self.ln_1 = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(OrderedDict([("c_fc", torch.nn.Linear(width, width * 4)),
                                                    ("gelu", RefQuickGELU()),
                                                    ("c_proj", torch.nn.Linear(width * 4, width))]))
        self.ln_2 = torch.nn.LayerNorm(width)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(torch.nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = torch.nn.Sequential(*[RefResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class RefClipVisual(torch.nn.Module):
    """A minimal clip.model.VisionTransformer (same parameter names and layout) whose
    forward returns BEiT v2's targets: ln_post(patch tokens) @ proj."""

    def __init__(self, resolution=32, patch=8, width=128, layers=2, heads=2, output_dim=24):
        super().__init__()
        scale = width ** -0.5
        self.conv1 = torch.nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = torch.nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = torch.nn.Parameter(scale * torch.randn((resolution // patch) ** 2 + 1, width))
        self.ln_pre = torch.nn.LayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads)
        self.ln_post = torch.nn.LayerNorm(width)
        self.proj = torch.nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x).reshape(x.shape[0], self.conv1.out_channels, -1).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # NLD -> LND -> NLD
        return self.ln_post(x[:, 1:, :]) @ self.proj


class RefClip(torch.nn.Module):  # a whole CLIP: `visual.` image tower beside text-tower weights
    def __init__(self):
        super().__init__()
        self.visual = RefClipVisual()
        self.transformer = RefTransformer(32, 1, 1)  # the text tower's names, unprefixed
        self.token_embedding = torch.nn.Embedding(10, 32)
        self.logit_scale = torch.nn.Parameter(torch.ones([]))

    def forward(self, x):
        return self.visual(x)


def random_clip(seed=0) -> RefClip:
    torch.manual_seed(seed)
    clip = RefClip().eval()
    with torch.no_grad():  # non-trivial norms and biases, so every loaded tensor matters
        for name, p in clip.named_parameters():
            if p.ndim == 1 and name != "visual.class_embedding":
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    return clip
