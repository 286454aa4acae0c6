"""visual_tokenizer stage: train the VQ-KD tokenizer (or load an official one)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VisualTokenizerConfig:
    out_dir: str = "data/visual_tokenizer"
    preset: str = "tiny"
    pretrained: str | None = None
