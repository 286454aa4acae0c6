"""Global dedup of the clean stage as sharded Ray tasks over spilled row chunks.

The map of pipelines.clean.rows spills every row to Parquet chunks (input
order, with ``order``: one int64 per row, and ``bands``: the row's near-dedup
bucket keys from :class:`pipelines.clean.dedup.NearRules`). Then:

1. :func:`dedup_shard`, one Ray task per shard ``s`` of ``n``, reads only the
   small columns of every chunk and keeps what hashes to ``s``:
   - exact: kept rows whose id hashes to ``s``; sorted by (kind, id, order), every
     row after the first of its id is a ``duplicate`` of the first;
   - near: (bucket key, order, id) of every band whose key hashes to ``s``; buckets
     with two or more distinct ids are candidate groups (an exact copy shares all
     its original's bands, so dropping repeated ids inside a bucket drops exactly
     the exact duplicates). Only the members of those groups are then read in
     full (signature, phash, thumbnail) and every pair is confirmed: an edge
     (later i, earlier j, detail).
   Exact duplicates and edges are written to ``work/`` (memory O(rows / n)).
2. :func:`resolve`, one Ray task, runs the greedy rule of pipelines.clean.dedup over
   the edges sorted by (i, j): i is dropped iff some earlier neighbour j is still
   kept, and the earliest such j is named. It writes ``dropped.parquet``: every
   dropped row, sorted by order. Its memory is O(duplicates + edges), never
   O(rows): rows with no near or exact copy never reach it.

The driver only passes paths: O(shards + chunks). Same rows give the same
dropped file (everything is sorted by order or id).

Cost: every shard task reads the small columns (order, kind, kept, id,
location, bands: ~200 bytes a text row) of every chunk, so reads grow as rows x
shards; with clean.dedup_shard_rows at 100k that is cheap up to some millions
of rows. Beyond that, the map should write these columns already partitioned
by shard (one row group per shard) so that each task reads only its own.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.clean.dedup import NearRules
from pipelines.common import storage

DROPPED_SCHEMA = pa.schema([("order", pa.int64()), ("kind", pa.string()), ("id", pa.string()),
                            ("location", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
                            ("step", pa.string())])
EDGE_SCHEMA = pa.schema([("i", pa.int64()), ("j", pa.int64()), ("kind", pa.string()), ("id", pa.string()),
                         ("location", pa.string()), ("detail", pa.string())])
CONFIRM_COLUMNS = ["order", "kind", "id", "location", "minhash", "phash", "thumb", "caption_hash"]


def id_shards(ids: pa.Array, num_shards: int) -> np.ndarray:
    """Shard of each hex content id (its first 15 hex digits mod ``num_shards``)."""
    return np.array([int(i[:15], 16) % num_shards for i in ids.to_pylist()], np.int64)


def dedup_shard(chunks: list[str], shard: int, num_shards: int, rules: NearRules, work: str) -> dict:
    """Ray task: exact duplicates and confirmed near-duplicate edges of one shard."""
    exact, bands = [], []
    for path in chunks:
        t = storage.read_parquet(path, columns=["order", "kind", "kept", "id", "location", "bands"])
        t = t.filter(t.column("kept"))
        if not len(t):
            continue
        exact.append(t.filter(pa.array(id_shards(t.column("id"), num_shards) == shard))
                     .select(["kind", "id", "order", "location"]))
        col = t.column("bands").combine_chunks()
        keys = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        if len(keys):
            mine = np.nonzero(keys % np.uint64(num_shards) == shard)[0]
            rows = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)[mine]
            bands.append(pa.table({"band": keys[mine], "order": t.column("order").take(rows),
                                   "id": t.column("id").take(rows)}))
    dups = _exact_duplicates(exact)
    edges = _near_edges(chunks, _candidate_groups(bands), rules)
    out = {"exact": storage.join(work, f"exact-{shard:05d}.parquet"),
           "edges": storage.join(work, f"edges-{shard:05d}.parquet")}
    storage.write_parquet(dups, out["exact"])
    storage.write_parquet(edges, out["edges"])
    return {**out, "exact_rows": len(dups), "edge_rows": len(edges)}


def _exact_duplicates(parts: list[pa.Table]) -> pa.Table:
    rows = {"order": [], "kind": [], "id": [], "location": [], "reason": [], "detail": [], "step": []}
    if parts:
        t = pa.concat_tables(parts).sort_by([("kind", "ascending"), ("id", "ascending"), ("order", "ascending")])
        kinds, ids = t.column("kind").to_pylist(), t.column("id").to_pylist()
        orders, where = t.column("order").to_pylist(), t.column("location").to_pylist()
        first = 0
        for k in range(1, len(t)):
            if (kinds[k], ids[k]) != (kinds[first], ids[first]):
                first = k
                continue
            _append(rows, order=orders[k], kind=kinds[k], id=ids[k], location=where[k], reason="duplicate",
                    detail=f"same content as {where[first]}", step="exact_dedup")
    return pa.table(rows, schema=DROPPED_SCHEMA)


def _candidate_groups(parts: list[pa.Table]) -> list[list[int]]:
    """Orders (ascending) of each bucket holding two or more distinct ids."""
    if not parts:
        return []
    t = pa.concat_tables(parts).sort_by([("band", "ascending"), ("order", "ascending")])
    band = t.column("band").to_numpy()
    starts = np.flatnonzero(np.r_[True, band[1:] != band[:-1]])
    ends = np.r_[starts[1:], len(band)]
    groups = []
    for lo, hi in zip(starts[ends - starts >= 2], ends[ends - starts >= 2]):
        orders, ids = t.column("order")[lo:hi].to_pylist(), t.column("id")[lo:hi].to_pylist()
        seen, members = set(), []
        for order, row_id in zip(orders, ids):
            if row_id not in seen:
                seen.add(row_id)
                members.append(order)
        if len(members) >= 2:
            groups.append(members)
    return groups


def _near_edges(chunks: list[str], groups: list[list[int]], rules: NearRules) -> pa.Table:
    """Confirm every pair of every candidate group; members are read in full only here."""
    needed = pa.array(sorted({o for g in groups for o in g}), pa.int64())
    rows: dict[int, dict] = {}
    if len(needed):
        for path in chunks:
            t = storage.read_parquet(path, columns=CONFIRM_COLUMNS)
            for row in t.filter(pc.is_in(t.column("order"), value_set=needed)).to_pylist():
                rows[row["order"]] = row
    edges = {name: [] for name in EDGE_SCHEMA.names}
    seen = set()
    for members in groups:
        for j, i in _pairs_to_confirm(members, rows, rules):
            if (i, j) in seen or rows[i]["kind"] != rows[j]["kind"]:
                continue
            seen.add((i, j))
            detail = rules.confirm(rows[i]["kind"], rows[j], rows[i])
            if detail:
                _append(edges, i=i, j=j, kind=rows[i]["kind"], id=rows[i]["id"], location=rows[i]["location"],
                        detail=detail)
    return pa.table(edges, schema=EDGE_SCHEMA)


def _pairs_to_confirm(members: list[int], rows: dict[int, dict], rules: NearRules) -> list[tuple[int, int]]:
    """(earlier, later) orders of a candidate group that may be near duplicates, in member
    order: every pair for text; for images only phashes within max_distance bits, found in
    one vectorised step (similar scenes fill large buckets, and confirm re-checks anyway)."""
    if any(rows[o]["phash"] is None for o in members):
        a, b = np.triu_indices(len(members), 1)
    else:
        hashes = np.array([rows[o]["phash"] for o in members], np.uint64)
        close = np.bitwise_count(hashes[:, None] ^ hashes[None, :]) <= rules.max_distance  # (m, m)
        a, b = np.nonzero(np.triu(close, 1))
    return [(members[x], members[y]) for x, y in zip(a.tolist(), b.tolist())]


def _append(columns: dict[str, list], **row) -> None:
    """Add one row to column lists; the caller names every column, so they stay aligned."""
    for name, value in row.items():
        columns[name].append(value)


def resolve(shard_outputs: list[dict], out_path: str) -> dict:
    """Ray task: greedy near dedup over all edges; writes every dropped row sorted by order."""
    exact = [storage.read_parquet(o["exact"]) for o in shard_outputs]
    edges = [storage.read_parquet(o["edges"]) for o in shard_outputs]
    edges = pa.concat_tables(edges).sort_by([("i", "ascending"), ("j", "ascending")]) if edges else EDGE_SCHEMA.empty_table()
    near = {name: [] for name in DROPPED_SCHEMA.names}
    dropped: set[int] = set()
    cols = [edges.column(n).to_pylist() for n in ("i", "j", "kind", "id", "location", "detail")]
    for i, j, kind, row_id, where, detail in zip(*cols):
        if i in dropped or j in dropped:  # i already resolved, or j is not a kept row to point at
            continue
        dropped.add(i)
        _append(near, order=i, kind=kind, id=row_id, location=where, reason="near_duplicate", detail=detail,
                step="near_dedup")
    table = pa.concat_tables([*exact, pa.table(near, schema=DROPPED_SCHEMA)]).sort_by("order")
    storage.write_parquet(table, out_path)
    return {"path": out_path, "rows": len(table)}


__all__ = ["DROPPED_SCHEMA", "dedup_shard", "resolve", "id_shards"]
