"""pack stage: deterministic mixed-modality Parquet shards plus manifest.json."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PackConfig:
    out_dir: str = "data/shards"
    shard_rows: int = 2000
    val_fraction: float = 0.05
    seed: int = 0
