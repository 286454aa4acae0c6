"""In-memory reference of the clean stage's dedup rules (pipelines.clean.dedup): one
metadata table, visited in input order. The tests check the sharded Ray version
(pipelines.clean.dedup_shards) against it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.clean.dedup import phash_bands


@dataclass(frozen=True)
class Duplicate:
    index: int       # row of the metadata table that is dropped
    reason: str      # duplicate | near_duplicate
    detail: str
    step: str        # exact_dedup | near_dedup



class PhashIndex:
    """Find an added 64-bit hash within ``max_distance`` bits of a query, exactly."""

    def __init__(self, max_distance: int):
        self.max_distance = max_distance
        self.bands = phash_bands(max_distance)
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.bands]
        self.hashes: dict[int, int] = {}

    def query(self, h: int, accept=lambda index: True) -> tuple[int, int] | None:
        """(index, distance) of the earliest-added hash within max_distance that ``accept``s, or None."""
        best = None
        for (shift, mask), table in zip(self.bands, self.tables):
            for idx in table.get((h >> shift) & mask, ()):
                dist = (h ^ self.hashes[idx]).bit_count()
                if dist <= self.max_distance and (best is None or idx < best[0]) and accept(idx):
                    best = (idx, dist)
        return best

    def add(self, h: int, index: int) -> None:
        self.hashes[index] = h
        for (shift, mask), table in zip(self.bands, self.tables):
            table.setdefault((h >> shift) & mask, []).append(index)


def find_duplicates(meta: pa.Table, kind: str, *, near: bool, near_threshold: float = 0.8,
                    num_perm: int = 128, phash_max_distance: int = 2,
                    max_color_diff: int = 24) -> list[Duplicate]:
    """Duplicates among ``meta`` rows (already in input order; columns id, location, and
    minhash for text / phash + thumb (+ caption_hash for pairs) for images)."""
    ids = meta.column("id").to_pylist()
    where = meta.column("location").to_pylist()
    first: dict[str, int] = {}
    dups: list[Duplicate] = []
    survivors = []
    for i, row_id in enumerate(ids):
        if row_id in first:
            j = first[row_id]
            dups.append(Duplicate(i, "duplicate", f"same content as {where[j]}", "exact_dedup"))
        else:
            first[row_id] = i
            survivors.append(i)
    if near and survivors:
        finder = _near_text if kind == "text" else _near_image
        dups += finder(meta, survivors, where, ids, kind=kind, near_threshold=near_threshold,
                       num_perm=num_perm, max_distance=phash_max_distance, max_color_diff=max_color_diff)
    return dups


def _near_text(meta, survivors, where, ids, *, near_threshold, num_perm, **_):
    from datasketch import LeanMinHash, MinHashLSH

    from pipelines.clean.text_filters import MINHASH_SCHEME, MINHASH_SEED

    sigs = meta.column("minhash").combine_chunks()
    values = sigs.values.to_numpy(zero_copy_only=False).reshape(len(sigs), -1)
    lsh = MinHashLSH(threshold=near_threshold, num_perm=num_perm)
    dups = []
    for i in survivors:
        sig = LeanMinHash(seed=MINHASH_SEED, hashvalues=values[i], scheme=MINHASH_SCHEME)
        match = None
        for j in lsh.query(sig):
            sim = float(np.mean(values[i] == values[j]))
            if sim >= near_threshold and (match is None or j < match[0]):
                match = (j, sim)
        if match:
            j, sim = match
            dups.append(Duplicate(i, "near_duplicate", f"~{sim:.2f} Jaccard with {ids[j]} at {where[j]}", "near_dedup"))
        else:
            lsh.insert(i, sig, check_duplication=False)
    return dups


def _near_image(meta, survivors, where, ids, *, kind, max_distance, max_color_diff, **_):
    hashes = meta.column("phash").to_pylist()
    thumbs = [np.frombuffer(t, np.uint8).astype(np.int16) for t in meta.column("thumb").to_pylist()]
    groups = meta.column("caption_hash").to_pylist() if kind == "pair" else None
    indexes: dict[str | None, PhashIndex] = {}
    dups = []
    for i in survivors:
        index = indexes.setdefault(groups[i] if groups else None, PhashIndex(max_distance))
        match = index.query(hashes[i], lambda j: int(np.abs(thumbs[i] - thumbs[j]).max()) <= max_color_diff)
        if match:
            j, dist = match
            dups.append(Duplicate(i, "near_duplicate", f"phash {dist} bits from {ids[j]} at {where[j]}", "near_dedup"))
        else:
            index.add(hashes[i], i)
    return dups
