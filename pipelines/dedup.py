"""Deduplication rules: which kept row is a copy of an earlier one.

Rows are visited in input order (source, unit, row), so the first occurrence is
kept and every later copy is rejected with a pointer to it; the result is
deterministic.

- exact: same id (content hash of the normalised text / RGB pixels / pair).
- text near: MinHash LSH bands (datasketch's banding for the threshold) over word
  shingles; candidates sharing a band are confirmed by the estimated Jaccard
  similarity, so banding false positives never drop a row.
- image near: perceptual-hash Hamming distance <= d, found exactly with the
  pigeonhole trick: split the 64 bits into d + 1 bands; two hashes within d
  bits agree on at least one band, so only rows sharing a band are compared.
  A candidate is confirmed only if the 8x8 colour thumbnails agree within
  ``max_color_diff`` in every cell (phash is blind to colour).
- pair near: an identical normalised caption *and* near-identical images.

Near dedup is greedy in input order: a row is dropped iff an earlier *kept* row
is a confirmed near-duplicate of it, and the earliest such row is named.

Two implementations of the same rules: :func:`find_duplicates` (in memory, over
one metadata table: the reference, used by tests) and pipelines.dedup_shards
(the clean stage's: sharded Ray tasks over spilled rows, driver memory
O(shards)). Both use :class:`NearRules` for band keys and confirmation.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class Duplicate:
    index: int       # row of the metadata table that is dropped
    reason: str      # duplicate | near_duplicate
    detail: str
    step: str        # exact_dedup | near_dedup


def phash_bands(max_distance: int) -> tuple[tuple[int, int], ...]:
    """(shift, mask) of the max_distance + 1 bands the 64 phash bits are split into."""
    n = max_distance + 1
    edges = [round(i * 64 / n) for i in range(n + 1)]
    return tuple((lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:]))


def text_band_ranges(threshold: float, num_perm: int) -> tuple[tuple[int, int], ...]:
    """[start, end) of each MinHash LSH band, exactly as datasketch bands for ``threshold``."""
    from datasketch import MinHashLSH

    return tuple(MinHashLSH(threshold=threshold, num_perm=num_perm).hashranges)


def band_hash(kind: str, band: int, key: bytes) -> int:
    """64-bit bucket key of one band value (kind and band index mixed in)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{kind}/{band}/".encode())
    h.update(key)
    return int.from_bytes(h.digest(), "little")


@dataclass(frozen=True)
class NearRules:
    """Near-duplicate rules per kind: band keys (candidates) and confirmation."""
    kinds: tuple[str, ...]                     # kinds with near dedup on
    threshold: float = 0.8                     # text: estimated Jaccard
    text_ranges: tuple[tuple[int, int], ...] = ()
    max_distance: int = 2                      # images: phash bits
    max_color_diff: int = 24

    @classmethod
    def build(cls, kinds, threshold=0.8, num_perm=128, max_distance=2, max_color_diff=24) -> "NearRules":
        return cls(tuple(kinds), threshold, text_band_ranges(threshold, num_perm) if "text" in kinds else (),
                   max_distance, max_color_diff)

    def bands(self, kind: str, row: dict) -> list[int] | None:
        """Bucket keys of a kept row (None: near dedup off for its kind). Rows that share
        a key are candidates; every confirmed pair shares one."""
        if kind not in self.kinds:
            return None
        if kind == "text":
            sig = np.asarray(row["minhash"], np.uint64)
            return [band_hash(kind, b, sig[lo:hi].tobytes()) for b, (lo, hi) in enumerate(self.text_ranges)]
        group = (row.get("caption_hash") or "").encode() if kind == "pair" else b""
        return [band_hash(kind, b, ((row["phash"] >> shift) & mask).to_bytes(8, "little") + group)
                for b, (shift, mask) in enumerate(phash_bands(self.max_distance))]

    def confirm(self, kind: str, first: dict, later: dict) -> str | None:
        """The rejection detail if ``later`` is a near-duplicate of the earlier ``first``."""
        def where() -> str:  # only for a confirmed pair: most candidates are not
            return f"{first['id']} at {first['location']}"
        if kind == "text":
            sim = float(np.mean(np.asarray(first["minhash"]) == np.asarray(later["minhash"])))
            return f"~{sim:.2f} Jaccard with {where()}" if sim >= self.threshold else None
        if kind == "pair" and first["caption_hash"] != later["caption_hash"]:
            return None
        dist = (first["phash"] ^ later["phash"]).bit_count()
        if dist > self.max_distance:
            return None
        a = np.frombuffer(first["thumb"], np.uint8).astype(np.int16)
        b = np.frombuffer(later["thumb"], np.uint8).astype(np.int16)
        return f"phash {dist} bits from {where()}" if int(np.abs(a - b).max()) <= self.max_color_diff else None


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

    from pipelines.text_filters import MINHASH_SCHEME, MINHASH_SEED

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


__all__ = ["Duplicate", "NearRules", "PhashIndex", "band_hash", "find_duplicates", "phash_bands", "text_band_ranges"]
