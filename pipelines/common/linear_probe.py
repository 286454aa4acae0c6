"""Linear probe: a logistic-regression classifier on frozen features (evaluate's image
features, visual_tokenizer's code histograms)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, *, steps: int, lr: float, weight_decay: float, seed: int) -> dict:
    """Standardise with the train statistics, fit softmax regression with full-batch AdamW for
    ``steps`` steps, report top-1 on val. x: (N, D) features, y: (N,) class indices."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    torch.manual_seed(seed)
    linear = torch.nn.Linear(train_x.shape[1], num_classes)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(linear(train_x), train_y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        train_top1 = float((linear(train_x).argmax(1) == train_y).float().mean())
        top1 = float((linear(val_x).argmax(1) == val_y).float().mean())
    return {"top1": round(top1, 4), "train_top1": round(train_top1, 4)}
