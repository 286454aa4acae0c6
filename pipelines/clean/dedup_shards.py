"""Global dedup of the clean stage as sharded Ray tasks over spilled row chunks.

The map of pipelines.clean.rows spills every row to Parquet chunks (input
order, with ``order``: one int64 per row, and ``bands``: the row's near-dedup
bucket keys from :class:`pipelines.clean.dedup.NearRules`). Then:

1. :func:`dedup_shard`, one Ray task per shard ``s`` of ``n``, reads its key
   partition, which holds what hashes to ``s``:
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
   dropped row, sorted by order, one file per chunk that has any. Its memory is O(duplicates + edges), never
   O(rows): rows with no near or exact copy never reach it.

The map writes the keys that step 1 needs already partitioned by shard
(:func:`write_keys`: ``keys/<shard>/<chunk's first order>.parquet``, one small
file per chunk and shard that has keys), so each shard task reads only its own
partition: total key reads are linear in rows, whatever the shard count. The
full rows of candidate-group members are read from the chunks that hold them,
only the row groups holding them. The driver only passes paths: O(shards +
chunks). Same rows give the same dropped rows (everything is sorted by order or
id), whatever the shard count.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.clean.dedup import NearRules
from pipelines.common import storage

DROPPED_SCHEMA = pa.schema([("order", pa.int64()), ("kind", pa.string()), ("id", pa.string()),
                            ("location", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
                            ("step", pa.string())])
EDGE_SCHEMA = pa.schema([("i", pa.int64()), ("j", pa.int64()), ("kind", pa.string()), ("id", pa.string()),
                         ("location", pa.string()), ("detail", pa.string())])
CONFIRM_COLUMNS = ["order", "kind", "id", "location", "minhash", "phash", "thumb", "caption_hash"]
# One shard's keys from one chunk: an exact-dedup entry (band null: a kept row whose id
# hashes to the shard) or a near-dedup bucket entry (band set; kind, id and location null,
# id_key: the id's first 64 bits, which tell exact copies apart inside a bucket). Bucket
# entries hold fixed-width numbers only: a row's id string is stored once (in its exact
# entry), not once per band in every shard's file, so the bytes per row stay flat as the
# shard count grows.
KEY_SCHEMA = pa.schema([("order", pa.int64()), ("kind", pa.string()), ("id", pa.string()),
                        ("location", pa.string()), ("band", pa.uint64()), ("id_key", pa.uint64())])
KEY_COLUMNS = ["order", "kind", "kept", "id", "location", "bands"]  # what the map passes to write_keys


def id_shards(ids: pa.Array, num_shards: int) -> np.ndarray:
    """Shard of each hex content id (its first 15 hex digits mod ``num_shards``)."""
    return np.array([int(i[:15], 16) % num_shards for i in ids.to_pylist()], np.int64)


def id_keys(ids: pa.Array) -> np.ndarray:
    """Each hex content id's first 64 bits (uint64)."""
    return np.array([int(i[:16], 16) for i in ids.to_pylist()], np.uint64)


def partition_keys(rows: pa.Table, num_shards: int) -> dict[int, pa.Table]:
    """{shard: KEY_SCHEMA table} of a chunk's rows (KEY_COLUMNS; rejected rows take no part)."""
    t = rows.filter(rows.column("kept"))
    if not len(t):
        return {}
    col = t.column("bands").combine_chunks()
    keys = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.uint64)
    parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
    none = pa.nulls(len(keys), pa.string())
    table = pa.concat_tables([
        pa.table([t.column("order"), t.column("kind"), t.column("id"), t.column("location"),
                  pa.nulls(len(t), pa.uint64()), pa.nulls(len(t), pa.uint64())], schema=KEY_SCHEMA),
        pa.table([t.column("order").take(parents), none, none, none, pa.array(keys, pa.uint64()),
                  pa.array(id_keys(t.column("id"))[parents], pa.uint64())], schema=KEY_SCHEMA)])
    shard = np.concatenate([id_shards(t.column("id"), num_shards), (keys % np.uint64(num_shards)).astype(np.int64)])
    return {int(s): table.filter(pa.array(shard == s)) for s in np.unique(shard)}


def key_path(keys: str, shard: int, first_order: int) -> str:
    return storage.join(keys, f"{shard:05d}", f"{first_order:019d}.parquet")


def write_keys(keys: str, first_order: int, rows: pa.Table, num_shards: int) -> None:
    """Write a chunk's keys, one file per shard that has any (fixed names: a retried map
    task rewrites the same files)."""
    for shard, table in partition_keys(rows, num_shards).items():
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        storage.write_bytes(key_path(keys, shard, first_order), sink.getvalue(), durable=False)


def dedup_shard(keys: str, chunks: list[tuple[int, str]], shard: int, rules: NearRules, work: str) -> dict:
    """Ray task: exact duplicates and confirmed near-duplicate edges of one shard, from its key
    partition under ``keys``; ``chunks`` ((first order, path), in order) are read only for the
    members of candidate groups. Returns the output paths and counts, with ``key_files`` and
    ``key_bytes``: the partition files it read and their total size."""
    files = storage.list_files(storage.join(keys, f"{shard:05d}"), ".parquet")
    t = pa.concat_tables([storage.read_parquet(f) for f in files]) if files else KEY_SCHEMA.empty_table()
    is_band = pc.is_valid(t.column("band"))
    exact = t.filter(pc.invert(is_band)).select(["kind", "id", "order", "location"])
    bands = t.filter(is_band).select(["band", "order", "id_key"])
    dups = _exact_duplicates([exact] if len(exact) else [])
    edges = _near_edges(chunks, _candidate_groups([bands] if len(bands) else []), rules)
    out = {"exact": storage.join(work, f"exact-{shard:05d}.parquet"),
           "edges": storage.join(work, f"edges-{shard:05d}.parquet")}
    storage.write_parquet(dups, out["exact"])
    storage.write_parquet(edges, out["edges"])
    key_bytes = sum(storage.file_info(f)[1] for f in files)  # each key file is read whole, once
    return {**out, "exact_rows": len(dups), "edge_rows": len(edges), "key_files": len(files), "key_bytes": key_bytes}


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
    """Orders (ascending) of each bucket holding two or more distinct ids (id_key)."""
    if not parts:
        return []
    t = pa.concat_tables(parts).sort_by([("band", "ascending"), ("order", "ascending")])
    band = t.column("band").to_numpy()
    starts = np.flatnonzero(np.r_[True, band[1:] != band[:-1]])
    ends = np.r_[starts[1:], len(band)]
    groups = []
    for lo, hi in zip(starts[ends - starts >= 2], ends[ends - starts >= 2]):
        orders, ids = t.column("order")[lo:hi].to_pylist(), t.column("id_key")[lo:hi].to_pylist()
        seen, members = set(), []
        for order, row_id in zip(orders, ids):
            if row_id not in seen:
                seen.add(row_id)
                members.append(order)
        if len(members) >= 2:
            groups.append(members)
    return groups


def _near_edges(chunks: list[tuple[int, str]], groups: list[list[int]], rules: NearRules) -> pa.Table:
    """Confirm every pair of every candidate group; members are read in full only here."""
    needed = np.array(sorted({o for g in groups for o in g}), np.int64)
    rows: dict[int, dict] = {}
    if len(needed):
        owner = np.searchsorted(np.array([c[0] for c in chunks], np.int64), needed, side="right") - 1
        for k in np.unique(owner):
            for row in _read_members(chunks[k][1], needed[owner == k]):
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


def _read_members(path: str, orders: np.ndarray) -> list[dict]:
    """CONFIRM_COLUMNS of the rows with these orders, reading only the row groups whose
    order range (Parquet statistics) can hold one of them."""
    fs, p = storage.filesystem(path)
    with fs.open_input_file(p) as f:
        pfile = pq.ParquetFile(f)
        meta, groups = pfile.metadata, []
        col = next(c for c in range(meta.num_columns) if meta.row_group(0).column(c).path_in_schema == "order") \
            if meta.num_row_groups else 0
        for g in range(meta.num_row_groups):
            st = meta.row_group(g).column(col).statistics
            if st is None or not st.has_min_max or np.any((orders >= st.min) & (orders <= st.max)):
                groups.append(g)
        t = pfile.read_row_groups(groups, columns=CONFIRM_COLUMNS)
    return t.filter(pc.is_in(t.column("order"), value_set=pa.array(orders, pa.int64()))).to_pylist()


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


def resolve(shard_outputs: list[dict], folder: str, chunk_firsts: list[int]) -> dict:
    """Ray task: greedy near dedup over all edges; writes every dropped row, sorted by order,
    to ``folder/<first order>.parquet`` of the chunk (first orders ascending) that holds it.
    Returns {first order: dropped rows} of the chunks that have any."""
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
    owner = np.searchsorted(np.array(chunk_firsts, np.int64), table.column("order").to_numpy(), side="right") - 1
    files = {}
    for k in np.unique(owner):
        first = int(chunk_firsts[k])
        storage.write_parquet(table.filter(pa.array(owner == k)), dropped_path(folder, first))
        files[first] = int(np.sum(owner == k))
    return files


def dropped_path(folder: str, first_order: int) -> str:
    return storage.join(folder, f"{first_order:019d}.parquet")


__all__ = ["DROPPED_SCHEMA", "KEY_SCHEMA", "KEY_COLUMNS", "dedup_shard", "resolve", "id_shards", "partition_keys",
           "write_keys", "dropped_path"]
