"""Sharded dedup (pipelines.clean.dedup_shards) gives exactly the in-memory reference's result;
clean's output parts respect their row and byte bounds and do not depend on batching."""
from __future__ import annotations

import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.clean import CleanConfig
from pipelines.clean.dedup import NearRules
from pipelines.clean.dedup_shards import KEY_COLUMNS, dedup_shard, resolve, write_keys
from pipelines.clean.parts import PartWriter, row_sizes
from pipelines.clean.rejects import content_id
from pipelines.clean.rows import ROW_SCHEMA, row_order
from pipelines.clean.text_filters import minhash, text_id
from pipelines.common import storage
from pipelines.common.configs import ParamsError, build
from tests.pipelines.dedup_reference import find_duplicates

RULES = dict(threshold=0.9, num_perm=128, max_distance=4, max_color_diff=10)


def text_rows(rng: random.Random) -> list[dict]:
    """Documents with exact copies and near-duplicate chains (a ~ a1 ~ a2, a !~ a2)."""
    vocab = [f"w{i}" for i in range(400)]
    docs = []
    for _ in range(12):
        base = [rng.choice(vocab) for _ in range(100)]
        variants = [base]
        for _ in range(rng.randrange(3)):  # each variant one more word away from the base
            v = list(variants[-1])
            v[rng.randrange(100)] = "changed"
            variants.append(v)
        docs += [" ".join(v) for v in variants]
    docs += rng.sample(docs, 6)  # exact copies
    rng.shuffle(docs)
    return [{"kind": "text", "kept": True, "id": text_id(d), "minhash": minhash(d, 128, 3)} for d in docs]


def image_rows(rng: random.Random, kind: str) -> list[dict]:
    """Phash/thumbnail pairs with near copies (few bits, small colour shift), colour-only
    differences (rejected by the thumbnail check) and, for pairs, caption groups."""
    rows = []
    for n in range(30):
        h, thumb = rng.getrandbits(64), bytes(rng.randrange(20, 230) for _ in range(192))
        caption = f"caption {n % 3}" if kind == "pair" else None
        rows.append((h, thumb, caption))
        for _ in range(rng.randrange(3)):
            flips = sum(1 << rng.randrange(64) for _ in range(rng.randrange(6)))
            shift = rng.choice([3, 30])
            rows.append((h ^ flips, bytes(min(255, b + shift) for b in thumb),
                         rng.choice([caption, "other caption"]) if kind == "pair" else None))
    rows += rng.sample(rows, 5)
    rng.shuffle(rows)
    out = []
    for h, thumb, caption in rows:
        row_id = content_id(h.to_bytes(8, "little"), thumb, (caption or "").encode())
        out.append({"kind": kind, "kept": True, "id": row_id, "phash": h, "thumb": thumb,
                    "caption_hash": content_id(caption.encode()) if caption else None})
    return out


def spill(tmp_path, rows: list[dict], rules: NearRules, per_chunk: int) -> list[tuple[int, str]]:
    """Rows as the clean map spills them (order, bands, a rejected row now and then):
    (first order, path) of each chunk."""
    full = []
    for k, row in enumerate(rows):
        full.append({**row, "order": row_order(0, k // per_chunk, k % per_chunk), "location": f"in/{k}",
                     "bands": rules.bands(row["kind"], row)})
        if k % 7 == 3:  # rejected rows never take part, even with a kept row's id
            full.append({"kind": row["kind"], "kept": False, "id": row["id"], "location": f"bad/{k}",
                         "order": row_order(1, k // per_chunk, k % per_chunk)})
    full.sort(key=lambda r: r["order"])
    paths = []
    for c in range(0, len(full), per_chunk):
        path = str(tmp_path / "rows" / f"{full[c]['order']:019d}.parquet")
        storage.write_parquet(pa.Table.from_pylist(full[c:c + per_chunk], schema=ROW_SCHEMA), path)
        paths.append((full[c]["order"], path))
    return paths


def sharded(tmp_path, chunks, shards: int, rules: NearRules) -> list[tuple]:
    """The dedup of clean_sources: keys partitioned as the map writes them, shard tasks, resolve."""
    work = str(tmp_path / f"work-{shards}")
    keys = os.path.join(work, "keys")
    for first, path in chunks:
        write_keys(keys, first, storage.read_parquet(path, columns=KEY_COLUMNS), shards)
    outs = [dedup_shard(keys, chunks, s, rules, work) for s in range(shards)]
    files = resolve(outs, os.path.join(work, "dropped"), [first for first, _ in chunks])
    assert set(files) <= {first for first, _ in chunks}
    parts = [storage.read_parquet(os.path.join(work, "dropped", f"{first:019d}.parquet")) for first in sorted(files)]
    table = pa.concat_tables(parts) if parts else None
    if table is None:
        return []
    assert table.column("order").to_pylist() == sorted(table.column("order").to_pylist())
    return [(r["location"], r["reason"], r["detail"], r["step"]) for r in table.to_pylist()]


def reference(rows: list[dict], kind: str) -> list[tuple]:
    meta = pa.Table.from_pylist([{**r, "location": f"in/{k}"} for k, r in enumerate(rows)], schema=ROW_SCHEMA)
    dups = find_duplicates(meta, kind, near=True, near_threshold=RULES["threshold"], num_perm=RULES["num_perm"],
                           phash_max_distance=RULES["max_distance"], max_color_diff=RULES["max_color_diff"])
    return [(f"in/{d.index}", d.reason, d.detail, d.step) for d in dups]


@pytest.mark.parametrize("kind", ["text", "image", "pair"])
def test_sharded_dedup_matches_in_memory_reference(tmp_path, kind):
    rng = random.Random(f"dedup/{kind}")
    rows = text_rows(rng) if kind == "text" else image_rows(rng, kind)
    rules = NearRules.build([kind], **RULES)
    expected = sorted(reference(rows, kind), key=lambda d: int(d[0].split("/")[1]))
    reasons = {d[1] for d in expected}
    assert reasons == {"duplicate", "near_duplicate"}, "the corpus must exercise both kinds of duplicate"
    paths = spill(tmp_path, rows, rules, per_chunk=9)
    for shards in (1, 3, 8):
        assert sharded(tmp_path, paths, shards, rules) == expected, f"{shards} shards"


def test_near_chain_keeps_a_row_whose_only_match_was_dropped(tmp_path):
    """a ~ a1 and a1 ~ a2 but a !~ a2 (a candidate pair, sharing a band, that similarity
    rejects): a1 goes, a2 stays, because a1 is no longer there to match it."""
    words = [f"w{i}" for i in range(60)]
    a1, a2 = list(words), list(words)
    for k in range(4):
        a1[2 + 5 * k] = a2[2 + 5 * k] = f"x{k}"
        a2[30 + 5 * k] = f"y{k}"
    docs = [" ".join(d) for d in (words, a1, a2)]
    rows = [{"kind": "text", "kept": True, "id": text_id(d), "minhash": minhash(d, 128, 3)} for d in docs]
    rules = NearRules.build(["text"], threshold=0.5, num_perm=128)
    sims = [float((rows[i]["minhash"] == rows[j]["minhash"]).mean()) for i, j in ((0, 1), (1, 2), (0, 2))]
    bands = [set(rules.bands("text", r)) for r in rows]
    assert min(sims[:2]) >= 0.5 > sims[2] and bands[0] & bands[1] and bands[1] & bands[2] and bands[0] & bands[2]
    got = sharded(tmp_path, spill(tmp_path, rows, rules, per_chunk=2), 2, rules)
    assert [(loc, reason) for loc, reason, *_ in got] == [("in/1", "near_duplicate")]


# ---------------------------------------------------------------- output parts

def parts_of(folder) -> list[bytes]:
    return [open(f, "rb").read() for f in storage.list_files(str(folder), ".parquet")]


def test_parts_are_bounded_in_bytes_and_independent_of_batching(tmp_path):
    rng = random.Random(0)
    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("source", pa.string())])
    table = pa.table({"id": [f"{i:04d}" for i in range(200)],
                      "image": [rng.randbytes(rng.randrange(100, 3000)) for _ in range(200)],
                      "source": ["s"] * 200}, schema=schema)
    table = pa.concat_tables([table, pa.table({"id": ["big"], "image": [b"x" * 200_000], "source": ["s"]},
                                              schema=schema)])
    limit = 65536
    whole = PartWriter(str(tmp_path / "a"), "image", schema, part_rows=50, part_bytes=limit)
    whole.add(table)
    stats = whole.close()
    single = PartWriter(str(tmp_path / "b"), "image", schema, part_rows=50, part_bytes=limit)
    for k in range(len(table)):
        single.add(table.slice(k, 1))
    single.close()
    assert parts_of(tmp_path / "a/image") == parts_of(tmp_path / "b/image")  # same bytes, whatever the batching
    files = storage.list_files(str(tmp_path / "a/image"))
    assert stats["rows"] == len(table) and stats["parts"] == len(files) > 1
    back = pa.concat_tables([pq.read_table(f) for f in files])
    assert back.equals(table)  # every row, in order
    for f in files:
        part = pq.read_table(f)
        assert len(part) <= 50
        assert int(row_sizes(part).sum()) <= limit or len(part) == 1  # only a lone oversized row exceeds it


def test_part_bytes_is_validated():
    with pytest.raises(ParamsError, match="clean.part_bytes"):
        build(CleanConfig, {"out_dir": "unused", "part_bytes": 100}, "clean")
    with pytest.raises(ParamsError, match="clean.part_bytes: expected an integer"):
        build(CleanConfig, {"out_dir": "unused", "part_bytes": "64MB"}, "clean")
    assert build(CleanConfig, {"out_dir": "unused", "part_bytes": 2**20}, "clean").part_bytes == 2**20


def test_each_shard_task_reads_only_its_own_key_partition(tmp_path, monkeypatch):
    """The map writes keys per (chunk, shard); a shard task reads its partition's files and
    nothing else of the keys, so total key reads are the keys written, once."""
    rng = random.Random("partitions")
    rows, rules, shards = text_rows(rng), NearRules.build(["text"], **RULES), 4
    chunks = spill(tmp_path, rows, rules, per_chunk=9)
    keys = str(tmp_path / "keys")
    for first, path in chunks:
        write_keys(keys, first, storage.read_parquet(path, columns=KEY_COLUMNS), shards)
    written = storage.list_files(keys, ".parquet")
    assert len(written) > len(chunks)  # several partitions per chunk
    reads, real = [], storage.read_parquet
    monkeypatch.setattr(storage, "read_parquet", lambda p, columns=None: reads.append(p) or real(p, columns))
    seen = []
    for s in range(shards):
        reads.clear()
        out = dedup_shard(keys, chunks, s, rules, str(tmp_path / "work"))
        key_reads = [p for p in reads if p.startswith(keys)]
        assert key_reads and all(p.startswith(os.path.join(keys, f"{s:05d}") + os.sep) for p in key_reads)
        assert out["key_files"] == len(key_reads) and not [p for p in reads if "/rows/" in p]
        seen += key_reads
    assert sorted(seen) == written
