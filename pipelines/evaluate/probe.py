"""Frozen image features of a backbone, for the linear probe (pipelines.common.linear_probe)."""
from __future__ import annotations

import torch

from model.beit3 import BEiT3


@torch.no_grad()
def image_features(backbone: BEiT3, images: torch.Tensor, pool: str, device, chunk: int = 128) -> torch.Tensor:
    """(N, 3, S, S) -> (N, D): the mean of the patch states (BEiT-3's classification pooling,
    before its fc_norm) or the cls state."""
    backbone.eval()
    feats = []
    for i in range(0, len(images), chunk):
        hidden = backbone.encode(image=images[i:i + chunk].to(device))  # (B, 1 + N, D)
        feats.append(hidden[:, 1:].mean(1) if pool == "mean" else hidden[:, 0])
    return torch.cat(feats).float().cpu()
