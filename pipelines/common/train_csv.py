"""The training log CSV (``pretrain.plots_path``): one row per training step, written
by pretrain and read by report (and by pretrain itself when it resumes)."""
from __future__ import annotations

import csv
import io
import os

from model.task import PART_KEYS

CSV_FIELDS = ["step", "loss", *[f"loss_{p}" for p in PART_KEYS], *[f"acc_{p}" for p in PART_KEYS],
              "lr", "grad_norm", "samples_per_s", "tokens_per_s", "elapsed_s"]


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("", None) else None for k, v in row.items()} for row in csv.DictReader(f)]


def csv_text(rows: list[dict], header: bool = True) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def _fmt(v) -> str:
    if v is None:
        return ""
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.8g}"


class LiveCSV:
    """The training log as it grows: rows appended as steps finish, so `dvc plots show`
    during a run draws what is done so far. Local paths only (object stores cannot append);
    the driver writes the complete file atomically when the run ends."""

    def __init__(self, path: str | None, history: list[dict]):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:  # a resumed run restarts the file at its checkpoint
                f.write(csv_text(history))

    def append(self, row: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(csv_text([row], header=False))
