"""Source declarations (params.yaml ``sources``) and readers for every format."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.configs import check

FORMATS = {
    "text": ("txt", "jsonl", "parquet"),
    "image": ("folder", "parquet", "webdataset"),
    "pair": ("jsonl", "parquet", "webdataset"),
}


@dataclass(frozen=True)
class SourceConfig:
    name: str
    kind: Literal["text", "image", "pair"]
    format: str
    path: str

    def __post_init__(self):
        check(bool(self.name), "sources[].name: must not be empty")
        check(
            self.format in FORMATS[self.kind],
            f"sources.{self.name}.format: {self.format!r} is not a {self.kind} format; "
            f"choose one of {list(FORMATS[self.kind])}",
        )
