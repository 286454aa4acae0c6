"""demo_data stage: generate the embedded demo corpus deterministically (no download)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoDataConfig:
    out_dir: str = "data/demo"
    seed: int = 0
    image_size: int = 96
    num_pairs: int = 3000
    num_images: int = 1000
    max_text_docs: int = 20000
