"""The packed shards as readers see them: the manifest, one split's shard index, and
a reader of one modality's rows (shared by pretrain, evaluate and report)."""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass

import pyarrow.compute as pc

from pipelines.common import storage
from pipelines.common.schema import MODALITIES, VIEW_COLUMNS

ROW_COLUMNS = ["id", "modality", "text_ids", "image", "visual_tokens"]


@dataclass(frozen=True)
class ShardIndex:
    """The shard list of one split and how many rows of each modality every shard holds."""

    paths: tuple[str, ...]
    counts: dict[str, tuple[int, ...]]  # modality -> rows per shard, aligned with paths
    views_per_image: int = 1            # K stored views per image row (manifest; schema.VIEW_LAYOUT)
    checksums: tuple[str, ...] = ()     # each shard's sha256 from the manifest, aligned with paths

    def total(self, modality: str) -> int:
        return sum(self.counts[modality])

    def digest(self) -> str:
        """Identifies the data of a run: shard names, counts and contents. Names and counts
        alone stay the same when the shards are rebuilt with another visual tokenizer, and a
        rerun would then resume the old run's checkpoint instead of training on the new codes."""
        key = (tuple(p.rsplit("/", 1)[-1] for p in self.paths), sorted(self.counts.items()))
        key = key if self.views_per_image == 1 else (*key, self.views_per_image)
        text = repr(key if not self.checksums else (*key, self.checksums))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def absolute(path: str) -> str:
    """A local path made absolute (Ray workers may run in another folder); URIs unchanged."""
    return path if storage.is_uri(path) else os.path.abspath(path)


def read_manifest(shards_dir: str) -> dict:
    path = storage.join(shards_dir, "manifest.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: no shard manifest; run the pack stage first")
    return storage.read_json(path)


def split_index(shards_dir: str, split: str, manifest: dict | None = None) -> ShardIndex:
    """The split's shards in the manifest's order (stray files in the folder are ignored) and
    their rows per modality: the manifest's ``rows_by_modality``, else counted from the
    shard's modality column."""
    manifest = manifest or read_manifest(shards_dir)
    entries = [e for e in manifest["shards"] if e["split"] == split]
    if not entries:
        raise ValueError(f"{shards_dir}/manifest.json lists no {split!r} shards")
    paths, counts = [], {m: [] for m in MODALITIES}
    checksums = tuple(e.get("sha256", "") for e in entries)
    for entry in entries:
        path = storage.join(shards_dir, entry["path"])
        known = entry.get("rows_by_modality")
        if known is None:
            modality = storage.read_parquet(path, columns=["modality"]).column("modality")
            known = {m: int(pc.sum(pc.equal(modality, m)).as_py() or 0) for m in MODALITIES}
        paths.append(path)
        for m in MODALITIES:
            counts[m].append(int(known.get(m, 0)))
    return ShardIndex(tuple(paths), {m: tuple(c) for m, c in counts.items()},
                      int(manifest.get("views_per_image", 1)), checksums if any(checksums) else ())


class ShardRowReader:
    """Reads rows of one modality from shards, keeping the few most recent shards in memory.
    With ``views`` and K > 1 image rows also hold the view columns (schema.VIEW_LAYOUT);
    without, only view 0 (``image`` / ``visual_tokens``, the centre crop) is read."""

    def __init__(self, index: ShardIndex, modality: str, cache_size: int = 2, views: bool = False):
        self.index = index
        self.modality = modality
        self.cache_size = cache_size
        self.columns = ROW_COLUMNS + (VIEW_COLUMNS if views and index.views_per_image > 1 else [])
        self._cache: OrderedDict[int, list[dict]] = OrderedDict()

    def rows_of(self, shard: int) -> list[dict]:
        if shard not in self._cache:
            table = storage.read_parquet(self.index.paths[shard], columns=self.columns)
            table = table.filter(pc.equal(table.column("modality"), self.modality))
            if table.num_rows != self.index.counts[self.modality][shard]:
                raise ValueError(f"{self.index.paths[shard]}: {table.num_rows} {self.modality} rows, "
                                 f"the index counted {self.index.counts[self.modality][shard]}; "
                                 "the shards changed under a running job")
            self._cache[shard] = table.to_pylist()
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(shard)
        return self._cache[shard]
