"""pretrain stage: Ray Train V2 TorchTrainer driver for BEiT-3 masked data modeling."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PretrainConfig:
    out_dir: str = "models/pretrain"
    lr: float = 1e-3
