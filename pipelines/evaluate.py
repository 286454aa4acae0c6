"""evaluate stage: masked-prediction accuracy, retrieval and linear probe vs random init."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvaluateConfig:
    model_dir: str = "models/pretrain"
