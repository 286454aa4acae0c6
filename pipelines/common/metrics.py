"""Stage metrics: metrics/<stage>.json, written atomically."""
from __future__ import annotations

from pipelines.common import storage

METRICS_DIR = "metrics"


def write_metrics(stage: str, metrics: dict, metrics_dir: str = METRICS_DIR) -> str:
    path = storage.join(metrics_dir, f"{stage}.json")
    storage.write_json(path, metrics)
    return path
