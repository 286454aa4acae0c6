"""Linear probe: a logistic-regression classifier on frozen backbone image features."""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, cfg, seed: int) -> dict:
    """Standardise with the train statistics, fit softmax regression with full-batch AdamW for
    cfg.steps steps, report top-1 on val. cfg: ProbeConfig."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    torch.manual_seed(seed)
    linear = torch.nn.Linear(train_x.shape[1], num_classes)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.steps):
        loss = F.cross_entropy(linear(train_x), train_y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        train_top1 = float((linear(train_x).argmax(1) == train_y).float().mean())
        top1 = float((linear(val_x).argmax(1) == val_y).float().mean())
    return {"top1": round(top1, 4), "train_top1": round(train_top1, 4)}
