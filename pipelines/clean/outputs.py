"""The output pass of the clean stage as parallel Ray tasks, with the parts a single
sequential writer would cut.

Every chunk contributes, in input order, its kept rows that dedup did not drop
(to its kind's parts) and its rejected rows merged by order with dedup's dropped
ones (to ``rejected/``): :func:`chunk_outputs`. Where parts are cut depends on
the rows alone (pipelines.clean.parts), so the pass runs in three steps:

1. :func:`chunk_sizes`, one Ray task per chunk: the size of each output row
   (parts.row_sizes), written to ``work/sizes/<first order>.parquet``, and the
   (source, kind, reason, step) counts of its rejected rows;
2. :func:`plan_parts`, one Ray task: replays the part writer's cut rule over
   those sizes (8 bytes a row) and returns, per output, where each part starts
   (chunk, row) and its row count: O(parts);
3. :func:`write_parts`, Ray tasks over runs of consecutive parts: each starts a
   fresh writer at a part boundary with the part's global number, so its files
   are byte-identical to the sequential writer's whatever the grouping, and
   written under their final names (a retried task rewrites the same files).

The driver only plans the tasks and sums their stats; each chunk is read twice
(sizes, then rows), a chunk on a part boundary once more.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.clean.dedup_shards import DROPPED_SCHEMA, dropped_path
from pipelines.clean.parts import PartWriter, row_sizes
from pipelines.clean.rejects import REJECTED_SCHEMA
from pipelines.common import storage
from pipelines.common.ray_session import bounded_tasks, cluster_cpus, spread_task

OUTPUT_SCHEMAS = {
    "text": pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string())]),
    "image": pa.schema([("id", pa.string()), ("image", pa.binary()), ("width", pa.int32()),
                        ("height", pa.int32()), ("source", pa.string())]),
    "pair": pa.schema([("id", pa.string()), ("image", pa.binary()), ("width", pa.int32()),
                       ("height", pa.int32()), ("caption", pa.string()), ("source", pa.string())]),
}
SCHEMAS = {**OUTPUT_SCHEMAS, "rejected": REJECTED_SCHEMA}
CHUNK_COLUMNS = ["order", "kept", "kind", "id", "image", "width", "height", "text", "source", "location",
                 "reason", "detail", "step"]
WRITE_TASKS_PER_CPU = 4


def write_outputs(ray, chunks: list[dict], dropped: dict[int, int], dirs: tuple[str, str, str], sources, cfg,
                  ray_cfg) -> tuple[dict, Counter]:
    """Write every output part into ``out``; ``dirs`` = (out, work, dropped folder),
    ``dropped`` = {first order: rows} of the chunks with dropped rows. Returns (part stats per
    output name, rejected rows per (source, kind, reason, step))."""
    out, work, dropped_dir = dirs
    cpus, timeout = cluster_cpus(ray), ray_cfg.no_progress_timeout_s
    items = [{**c, "dropped": dropped_path(dropped_dir, c["first_order"]) if c["first_order"] in dropped else None}
             for c in chunks]
    shared = ray.put((items, sources, cfg))
    sizes = [storage.join(work, "sizes", f"{c['first_order']:019d}.parquet") for c in chunks]
    counts = Counter()
    task = spread_task(ray, chunk_sizes, ray_cfg.cpus_per_task)
    for _, got in bounded_tasks(ray, task, {k: (shared, k, sizes[k]) for k in range(len(chunks))}, cpus, timeout):
        counts.update({tuple(key): n for key, n in got})
    plan = ray.get(spread_task(ray, plan_parts, ray_cfg.cpus_per_task).remote(sizes, cfg.part_rows, cfg.part_bytes))
    jobs = {}
    for name, parts in plan.items():
        per_task = max(1, math.ceil(len(parts) / (WRITE_TASKS_PER_CPU * cpus)))
        for p in range(0, len(parts), per_task):
            jobs[(name, p)] = (shared, name, p, parts[p:p + per_task], out)
    stats = {name: {"parts": 0, "rows": 0, "bytes": 0, "by_source": Counter()} for name in SCHEMAS}
    task = spread_task(ray, write_parts, ray_cfg.cpus_per_task)
    for (name, _), st in bounded_tasks(ray, task, jobs, cpus, timeout):
        for key in ("parts", "rows", "bytes"):
            stats[name][key] += st[key]
        stats[name]["by_source"].update(st["by_source"])
    return {name: st for name, st in stats.items() if st["rows"] or name == "rejected"}, counts


def chunk_outputs(item: dict, source, names=tuple(SCHEMAS)) -> dict[str, pa.Table]:
    """{output name: rows} the chunk adds, in order: its kind's kept rows minus dedup's dropped
    ones, and its rejected rows merged by order with the dropped ones (only ``names``)."""
    rows = storage.read_parquet(item["path"], columns=CHUNK_COLUMNS)
    gone = storage.read_parquet(item["dropped"]) if item["dropped"] else DROPPED_SCHEMA.empty_table()
    tables = {}
    if source.kind in names:
        kept = pc.and_(rows.column("kept"), pc.invert(pc.is_in(rows.column("order"), value_set=gone.column("order"))))
        tables[source.kind] = _output_table(rows.filter(kept), source.kind)
    if "rejected" in names:
        rejected = rows.filter(pc.invert(rows.column("kept"))).select(DROPPED_SCHEMA.names)
        rejected = pa.concat_tables([rejected, gone]).sort_by("order")
        rejected = rejected.append_column("source", pa.array([source.name] * len(rejected), pa.string()))
        tables["rejected"] = rejected.select(REJECTED_SCHEMA.names)
    return tables


def _output_table(batch: pa.Table, kind: str) -> pa.Table:
    schema = OUTPUT_SCHEMAS[kind]
    named = batch.rename_columns(["caption" if c == "text" and kind == "pair" else c for c in batch.column_names])
    return pa.table([named.column(f.name).cast(f.type) for f in schema], schema=schema)


def chunk_sizes(shared: tuple, k: int, path: str) -> list:
    """Ray task: write chunk ``k``'s output row sizes (name, size) to ``path``; returns its
    rejected-row counts as [((source, kind, reason, step), rows)]."""
    items, sources, _ = shared
    tables = chunk_outputs(items[k], sources[items[k]["source_idx"]])
    names = [name for name, t in tables.items() for _ in range(len(t))]
    sizes = np.concatenate([row_sizes(t) for t in tables.values()]) if tables else np.zeros(0, np.int64)
    storage.write_parquet(pa.table({"name": pa.array(names, pa.string()), "size": pa.array(sizes, pa.int64())}), path)
    rej = tables["rejected"]
    keys = zip(*(rej.column(c).to_pylist() for c in ("source", "kind", "reason", "step")))
    return list(Counter(keys).items())


def plan_parts(size_files: list[str], part_rows: int, part_bytes: int) -> dict[str, list[tuple[int, int, int]]]:
    """Ray task: per output name, (chunk, first row of the chunk's rows of that name, rows) of
    each part, by PartWriter's rule: a part closes before the row that would take it past
    part_rows rows or part_bytes bytes (a row alone may exceed part_bytes)."""
    state = {name: {"parts": [], "n": 0, "size": 0, "start": (0, 0)} for name in SCHEMAS}
    for k, path in enumerate(size_files):
        t = storage.read_parquet(path)
        for name, st in state.items():
            sizes = t.filter(pc.equal(t.column("name"), name)).column("size").to_numpy()
            _cut(st, k, sizes, part_rows, part_bytes)
    for st in state.values():
        if st["n"]:
            st["parts"].append((*st["start"], st["n"]))
    return {name: st["parts"] for name, st in state.items()}


def _cut(st: dict, k: int, sizes: np.ndarray, part_rows: int, part_bytes: int) -> None:
    """Advance one output's cut state over chunk ``k``'s row sizes."""
    pos = 0
    while pos < len(sizes):
        if st["n"] and (st["n"] >= part_rows or st["size"] + sizes[pos] > part_bytes):
            st["parts"].append((*st["start"], st["n"]))
            st["n"] = st["size"] = 0
        if not st["n"]:
            st["start"] = (k, pos)
        room = part_rows - st["n"]
        fit = int(np.searchsorted(np.cumsum(sizes[pos:pos + room]), part_bytes - st["size"], side="right"))
        n = fit if st["n"] else max(1, fit)
        st["n"] += n
        st["size"] += int(sizes[pos:pos + n].sum())
        pos += n


def write_parts(shared: tuple, name: str, first_part: int, parts: list[tuple[int, int, int]], out: str) -> dict:
    """Ray task: write parts ``first_part ...`` of output ``name`` (consecutive, as planned)."""
    items, sources, cfg = shared
    writer = PartWriter(out, name, SCHEMAS[name], cfg.part_rows, cfg.part_bytes, first_part=first_part)
    k, offset = parts[0][0], parts[0][1]
    remaining = sum(n for _, _, n in parts)
    while remaining:
        rows = chunk_outputs(items[k], sources[items[k]["source_idx"]], (name,)).get(name)
        if rows is not None and len(rows) > offset:
            piece = rows.slice(offset, remaining)
            writer.add(piece)
            remaining -= len(piece)
        k, offset = k + 1, 0
    stats = writer.close()
    if stats["parts"] != len(parts):
        raise RuntimeError(f"clean: {name} parts {first_part}+: planned {len(parts)}, wrote {stats['parts']}")
    return {**stats, "by_source": dict(stats["by_source"])}


__all__ = ["OUTPUT_SCHEMAS", "CHUNK_COLUMNS", "write_outputs", "chunk_outputs", "plan_parts", "write_parts"]
