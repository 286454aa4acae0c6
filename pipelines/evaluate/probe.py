"""Frozen image features of a backbone, for the linear probe (pipelines.common.linear_probe)."""
from __future__ import annotations

import torch

from model.beit3 import BEiT3
from pipelines.common.eval_data import ImageFiles


@torch.no_grad()
def image_features(backbone: BEiT3, images: ImageFiles, pool: str, device, chunk: int = 128) -> torch.Tensor:
    """N image files -> (N, D): the mean of the patch states (BEiT-3's classification pooling,
    before its fc_norm) or the cls state. Images are decoded ``chunk`` at a time."""
    backbone.eval()
    feats = []
    for x in images.batches(chunk):
        hidden = backbone.encode(image=x.to(device))  # (B, 1 + N, D)
        feats.append((hidden[:, 1:].mean(1) if pool == "mean" else hidden[:, 0]).float().cpu())
    return torch.cat(feats)
