"""clean stage: read every source, filter, dedup; write kept and rejected rows."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CleanConfig:
    out_dir: str = "data/clean"
