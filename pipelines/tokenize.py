"""tokenize stage: one Ray Data job running both tokenizers over the cleaned data."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenizeConfig:
    out_dir: str = "data/tokenized"
    batch_size: int = 64
    num_actors: int = 2
    num_gpus: float = 0.0
