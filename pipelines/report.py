"""report stage: one self-contained HTML page of the whole run."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReportConfig:
    out: str = "report/index.html"
