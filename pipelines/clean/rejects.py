"""Rejections and content ids shared by the readers, the filters and dedup.

A cleaning step either returns its (possibly transformed) input, meaning keep,
or raises :class:`Reject` with a short machine-readable ``reason`` and a
human-readable ``detail``. :func:`run_steps` runs a chain of named steps
(datatrove style) and stamps the name of the step that dropped the row onto
the rejection, so metrics can count what every step forwarded and dropped.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import pyarrow as pa

# One row of <clean.out_dir>/rejected/part-NNNNN.parquet (docs/INTERFACES.md:
# source, kind, id, reason, detail; step and location added so a user can find
# the offending input and the step that dropped it).
REJECTED_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("kind", pa.string()),
    ("id", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("step", pa.string()),
    ("location", pa.string()),
])

MAX_DETAIL_CHARS = 300


class Reject(Exception):
    """Drop this row: ``reason`` is a stable key (metrics), ``detail`` says why."""

    def __init__(self, reason: str, detail: str = "", step: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:MAX_DETAIL_CHARS]
        self.step = step


Step = tuple[str, Callable[[Any, Any], Any]]


def run_steps(steps: Sequence[Step], value: Any, cfg: Any) -> Any:
    """Apply ``steps`` (name, fn(value, cfg) -> value) in order; a Reject gets the step's name."""
    for name, fn in steps:
        try:
            value = fn(value, cfg)
        except Reject as rej:
            rej.step = rej.step or name
            raise
    return value


def content_id(*parts: bytes) -> str:
    """Stable hex id of some content: SHA-256 over length-prefixed parts, first 128 bits.
    SHA-256 rather than BLAKE2b: CPUs with SHA extensions hash it faster, and clean hashes
    the pixels of every image once."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:32]


__all__ = ["REJECTED_SCHEMA", "Reject", "run_steps", "content_id", "Step"]
