"""text_tokenizer stage: train (or load) the sentencepiece model."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextTokenizerConfig:
    out_dir: str = "data/text_tokenizer"
    vocab_size: int = 2000
    pretrained: str | None = None
