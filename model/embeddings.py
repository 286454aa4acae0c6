"""Token embeddings: image patches (+ cls, mask token) and the position tables."""
from __future__ import annotations

import torch
from torch import nn

from model.config import POSITION_OFFSET, BEiT3Config


class VisionEmbedding(nn.Module):
    """Conv patch projection, optional mask-token replacement, prepended cls token."""

    def __init__(self, cfg: BEiT3Config):
        super().__init__()
        self.image_size = cfg.image_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size,
                              stride=cfg.patch_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))

    def forward(self, image: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """image (B, C, H, W), image_mask (B, N) bool True = masked -> (B, 1 + N, D)."""
        B, _, H, W = image.shape
        if H != self.image_size or W != self.image_size:
            raise ValueError(f"image is {H}x{W}, the model expects {self.image_size}x{self.image_size}")
        x = self.proj(image).flatten(2).transpose(1, 2)  # (B, N, D)
        if image_mask is not None:
            if image_mask.shape != x.shape[:2]:
                raise ValueError(f"image_mask has shape {tuple(image_mask.shape)}, "
                                 f"expected {tuple(x.shape[:2])} (batch, patches)")
            # exactly the official blend x*(1-w) + mask*w for a 0/1 weight w
            x = torch.where(image_mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        return torch.cat([self.cls_token.to(x.dtype).expand(B, -1, -1), x], dim=1)


class PositionTables(nn.Module):
    """Learned absolute positions: vision (num_patches + 3 rows), text (max_text_positions rows).

    Both start at row POSITION_OFFSET (= 2, as fairseq); in image-text inputs
    the text positions restart at 2.
    """

    def __init__(self, cfg: BEiT3Config):
        super().__init__()
        self.vision = nn.Embedding(cfg.num_patches + 1 + POSITION_OFFSET, cfg.dim)
        self.text = nn.Embedding(cfg.max_text_positions, cfg.dim)

    def forward(self, num_vision: int, num_text: int) -> torch.Tensor:
        """-> (num_vision + num_text, D) to add to every sample of the batch."""
        rows = []
        if num_vision:
            rows.append(self.vision.weight[POSITION_OFFSET:POSITION_OFFSET + num_vision])
        if num_text:
            rows.append(self.text.weight[POSITION_OFFSET:POSITION_OFFSET + num_text])
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
