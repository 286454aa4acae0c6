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

pipelines.clean.dedup_shards applies them as sharded Ray tasks over the spilled
rows; tests/pipelines/dedup_reference.py is an in-memory reference of the same rules
that the tests compare it with. Both use :class:`NearRules` for band keys and
confirmation.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


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


__all__ = ["NearRules", "band_hash", "phash_bands", "text_band_ranges"]
