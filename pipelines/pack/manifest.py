"""pack's bookkeeping: which shards a previous run finished (resume), manifest.json and
manifest.partial.json, and the removal of stale shard files."""
from __future__ import annotations

from pipelines.common import storage
from pipelines.common.schema import MODALITIES, VIEW_LAYOUT, shard_schema

MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
SPLITS = ("train", "val")


def finished_shards(out_dir: str, fingerprint: str) -> tuple[dict[str, int] | None, dict[str, dict]]:
    """(shards per split if a previous run with this fingerprint got that far, its entries whose
    file still has its sha256). Same fingerprint, same shard plan: its entries are this run's."""
    previous, split_shards = {}, None
    for name in (PARTIAL, MANIFEST):
        path = storage.join(out_dir, name)
        if storage.exists(path):
            recorded = storage.read_json(path)
            if recorded.get("fingerprint") == fingerprint:
                entries = recorded["shards"]
                previous.update(entries if isinstance(entries, dict) else {e["path"]: e for e in entries})
                counts = recorded.get("split_shards") or _split_counts(recorded)
                split_shards = counts or split_shards
    done = {}
    for rel, entry in sorted(previous.items()):
        path = storage.join(out_dir, rel)
        if storage.exists(path) and storage.sha256_file(path) == entry["sha256"]:
            done[rel] = {k: v for k, v in entry.items() if k != "path"}
    return split_shards, done


def _split_counts(manifest: dict) -> dict[str, int] | None:
    splits = manifest.get("splits")
    return {s: splits[s]["shards"] for s in SPLITS} if isinstance(splits, dict) else None


def build_manifest(cfg, inputs, tokenizers: dict, paths: list[str], done: dict) -> dict:
    """manifest.json of a finished run: ``cfg`` a PackConfig, ``inputs`` its planned Inputs."""
    shards = [{"path": p, **done[p]} for p in paths]
    by_split = {split: [e for e in shards if e["split"] == split] for split in SPLITS}
    # K = 1 (no view keys; readers take 1) keeps the manifest of before views existed, byte for byte
    views = {"views_per_image": inputs.views_per_image, "view_layout": VIEW_LAYOUT} if inputs.views_per_image > 1 else {}
    return views | {
        "format": "parquet", "compression": cfg.compression,
        "schema": [f.name for f in shard_schema(inputs.views_per_image)],
        "seed": cfg.seed, "shard_rows": cfg.shard_rows, "val_fraction": cfg.val_fraction,
        "tokenizers": tokenizers, "fingerprint": inputs.fingerprint,
        "rows": sum(e["rows"] for e in shards), "bytes": sum(e["bytes"] for e in shards),
        "duplicate_ids": sum(e.get("duplicate_ids", 0) for e in shards),
        "rows_by_modality": _modality_totals(shards),
        "splits": {split: {"shards": len(es), "rows": sum(e["rows"] for e in es),
                           "rows_by_modality": _modality_totals(es)} for split, es in by_split.items()},
        "shards": shards,
    }


def _modality_totals(entries: list[dict]) -> dict[str, int]:
    return {m: sum(e["rows_by_modality"][m] for e in entries) for m in MODALITIES}


def write_partial(out_dir: str, fingerprint: str, split_shards: dict | None, done: dict) -> None:
    storage.write_json(storage.join(out_dir, PARTIAL),
                       {"fingerprint": fingerprint, "split_shards": split_shards, "shards": done})


def remove_stale(out_dir: str, keep: set[str]) -> None:
    """Delete shard files that are not finished shards of this plan, and temp files of killed writes."""
    for split in SPLITS:
        base = storage.join(out_dir, split)
        for path in storage.list_files(base):
            if f"{split}/{path[len(base) + 1:]}" not in keep:
                storage.remove(path)
    storage.remove_temp_files(out_dir)
