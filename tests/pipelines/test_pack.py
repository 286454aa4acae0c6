"""pack stage: deterministic, mixed, resumable shards with a correct manifest."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.common import storage
from pipelines.common.ray_session import RayConfig
from pipelines.common.schema import SHARD_SCHEMA, shard_table
from pipelines.pack import PackConfig, pack_shards
from tests.pipelines.test_text_tokenizer import png
from tests.project import PROJECT_ROOT, project_env

RAY = RayConfig(num_cpus=4, cpus_per_task=0.5)
TOKENIZERS = {"text": {"sha256": "a" * 64, "vocab_size": 300}, "visual": {"sha256": "b" * 64}}


def write_tokenized_dir(root, n_text=60, n_image=30, n_pair=30, parts=2) -> str:
    """Tokenized parts as the tokenize stage writes them (SHARD_SCHEMA), plus tokenizers.json."""
    rng = random.Random(0)

    def row(modality, i):
        has_text, has_image = modality != "image", modality != "text"
        return {"id": hashlib.sha256(f"{modality}{i}".encode()).hexdigest(), "modality": modality,
                "text_ids": [0, *[rng.randrange(5, 300) for _ in range(rng.randrange(1, 30))], 2] if has_text else None,
                "image": png(rng, (8, 8)) if has_image else None,
                "visual_tokens": [rng.randrange(512) for _ in range(4)] if has_image else None,
                "source": f"src_{modality}"}

    for modality, n in (("text", n_text), ("image", n_image), ("pair", n_pair)):
        rows = [row(modality, i) for i in range(n)]
        for p in range(parts):
            chunk = rows[p::parts]
            table = shard_table({f.name: [r[f.name] for r in chunk] for f in SHARD_SCHEMA})
            storage.write_parquet(table, str(root / modality / f"part-{p:05d}.parquet"))
    storage.write_json(str(root / "tokenizers.json"), TOKENIZERS)
    return str(root)


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> str:
    return write_tokenized_dir(tmp_path_factory.mktemp("tokenized"))


def shard_files(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_byte_identical_manifest_and_mixed_shards(ray_local, tokenized, tmp_path):
    def cfg(name, **kw):
        return PackConfig(out_dir=str(tmp_path / name), shard_rows=16, val_fraction=0.2, seed=3, **kw)

    metrics = pack_shards(cfg("a"), tokenized, RAY)
    pack_shards(cfg("b"), tokenized, RAY)  # a second run
    files = shard_files(tmp_path / "a")
    assert files == shard_files(tmp_path / "b")  # shards and manifest, byte for byte
    assert not (tmp_path / "b" / ".scatter").exists() and "manifest.partial.json" not in files

    manifest = json.loads(files["manifest.json"])
    assert manifest["tokenizers"] == TOKENIZERS
    assert manifest["rows"] == metrics["rows"] == 120
    assert manifest["rows_by_modality"] == {"text": 60, "image": 30, "pair": 30}
    assert set(files) == {"manifest.json"} | {e["path"] for e in manifest["shards"]}
    seen = {}
    for entry in manifest["shards"]:
        data = files[entry["path"]]
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
        table = pq.read_table(tmp_path / "a" / entry["path"])
        assert table.schema.equals(SHARD_SCHEMA, check_metadata=False)
        assert pq.ParquetFile(tmp_path / "a" / entry["path"]).metadata.row_group(0).column(0).compression == "ZSTD"
        mods = table["modality"].to_pylist()
        assert entry["rows"] == len(mods) <= 16
        assert entry["rows_by_modality"] == {m: mods.count(m) for m in ("text", "image", "pair")}
        seen.update({i: entry["split"] for i in table["id"].to_pylist()})
    assert len(seen) == 120  # every row exactly once, train and val disjoint
    splits = manifest["splits"]
    assert splits["train"]["rows"] + splits["val"]["rows"] == 120 and 10 <= splits["val"]["rows"] <= 40
    full = [e for e in manifest["shards"] if e["split"] == "train"][:-1]
    assert all(e["rows"] == 16 for e in full)
    assert sum(1 for e in manifest["shards"] if sum(v > 0 for v in e["rows_by_modality"].values()) >= 2) >= 4


def test_split_depends_only_on_seed_and_id(ray_local, tokenized, tmp_path):
    def val_ids(name, **kw):
        pack_shards(PackConfig(out_dir=str(tmp_path / name), val_fraction=0.2, **kw), tokenized, RAY)
        return {i for p in (tmp_path / name / "val").glob("*.parquet") for i in pq.read_table(p)["id"].to_pylist()}

    assert val_ids("rows16", shard_rows=16) == val_ids("rows7", shard_rows=7)
    assert val_ids("seed1", shard_rows=16, seed=1) != val_ids("rows16b", shard_rows=16)


def test_shard_rows_changes_shard_count_and_removes_stale_shards(ray_local, tokenized, tmp_path):
    out = tmp_path / "shards"
    small = pack_shards(PackConfig(out_dir=str(out), shard_rows=10, val_fraction=0.0), tokenized, RAY)
    assert small["shards"] == 12 and len(list((out / "train").iterdir())) == 12
    large = pack_shards(PackConfig(out_dir=str(out), shard_rows=50, val_fraction=0.0), tokenized, RAY)
    assert large["shards"] == 3 and large["shards_reused"] == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"shard-{k:05d}.parquet" for k in range(3)]


def test_resume_keeps_finished_shards(ray_local, tokenized, tmp_path):
    out = tmp_path / "shards"
    cfg = PackConfig(out_dir=str(out), shard_rows=16, val_fraction=0.2)
    pack_shards(cfg, tokenized, RAY)
    reference = shard_files(out)
    manifest = json.loads(reference["manifest.json"])
    paths = [e["path"] for e in manifest["shards"]]
    mtimes = {p: os.stat(out / p).st_mtime_ns for p in paths}

    # a killed run: the final manifest is not there yet, the partial one lists some shards,
    # one listed shard was deleted and one was truncated, one temp file was left behind
    (out / "manifest.json").unlink()
    partial = {e["path"]: {k: v for k, v in e.items() if k != "path"} for e in manifest["shards"][:-2]}
    storage.write_json(str(out / "manifest.partial.json"), {"fingerprint": manifest["fingerprint"], "shards": partial})
    (out / paths[0]).unlink()
    (out / paths[1]).write_bytes(reference[paths[1]][:100])
    (out / paths[-1]).unlink()
    (out / "train" / "shard-00000.parquet.tmp-dead").write_bytes(b"half")

    metrics = pack_shards(cfg, tokenized, RAY)
    rewritten = {paths[0], paths[1], paths[-2], paths[-1]}
    assert metrics["shards_written"] == 4 and metrics["shards_reused"] == len(paths) - 4
    assert shard_files(out) == reference
    assert all(os.stat(out / p).st_mtime_ns == mtimes[p] for p in paths if p not in rewritten)

    again = pack_shards(cfg, tokenized, RAY)  # complete output: nothing to redo
    assert again["shards_written"] == 0 and shard_files(out) == reference


def test_bad_part_schema_is_a_clear_error(ray_local, tmp_path):
    tokenized = tmp_path / "tok"
    write_tokenized_dir(tokenized, 4, 0, 0, parts=1)
    table = pq.read_table(tokenized / "text" / "part-00000.parquet").drop_columns(["source"])
    pq.write_table(table, tokenized / "text" / "part-00001.parquet")
    with pytest.raises(Exception, match="is not the shard schema"):
        pack_shards(PackConfig(out_dir=str(tmp_path / "out")), str(tokenized), RAY)


def shard_ids(out) -> dict[str, list[list[str]]]:
    """Per split, each shard's ids in manifest order."""
    manifest = json.loads((out / "manifest.json").read_text())
    ids = {"train": [], "val": []}
    for entry in manifest["shards"]:
        ids[entry["split"]].append(pq.read_table(out / entry["path"])["id"].to_pylist())
    return ids


def hash_key(seed: int, row_id: str) -> int:
    """The sort key pack documents: the last 8 bytes of blake2b(f"{seed}\\0{id}")."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{row_id}".encode(), digest_size=16).digest()[8:], "big")


def test_same_bytes_whatever_the_tasks_in_flight(ray_local, tokenized, tmp_path, monkeypatch):
    from pipelines import pack

    def cfg(name):
        return PackConfig(out_dir=str(tmp_path / name), shard_rows=16, val_fraction=0.2, seed=3)

    pack_shards(cfg("wide"), tokenized, RAY)
    monkeypatch.setattr(pack, "cluster_cpus", lambda ray: 1)  # one scatter / gather task at a time
    pack_shards(cfg("serial"), tokenized, RAY)
    assert shard_files(tmp_path / "wide") == shard_files(tmp_path / "serial")


def test_same_bytes_whatever_the_scatter_units(ray_local, tokenized, tmp_path):
    """pack.scatter_bytes only cuts the work: one part per scatter file, or all six parts in
    one, give the same shards and manifest."""
    from pipelines.pack import scatter_units

    assert scatter_units(["a", "b", "c", "d"], [5, 5, 5, 20], 10) == (("a", "b"), ("c",), ("d",))
    metrics = {}
    for name, scatter_bytes in (("one_per_part", 1), ("one_for_all", 2**40)):
        cfg = PackConfig(out_dir=str(tmp_path / name), shard_rows=16, val_fraction=0.2, seed=3,
                         scatter_bytes=scatter_bytes)
        metrics[name] = pack_shards(cfg, tokenized, RAY)
    assert metrics["one_per_part"]["scatter_files"] == 6 and metrics["one_for_all"]["scatter_files"] == 1
    assert metrics["one_per_part"]["parts_scattered"] == metrics["one_for_all"]["parts_scattered"] == 6
    assert shard_files(tmp_path / "one_per_part") == shard_files(tmp_path / "one_for_all")


def test_every_row_lands_once_even_duplicated_ids(ray_local, tmp_path):
    tokenized = tmp_path / "tok"
    write_tokenized_dir(tokenized, 40, 10, 10, parts=2)
    copy = pq.read_table(tokenized / "text" / "part-00000.parquet").slice(0, 5)
    copy = copy.set_column(5, "source", pa.array(["copy"] * 5)).cast(SHARD_SCHEMA)  # same ids, other content
    storage.write_parquet(copy, str(tokenized / "text" / "part-00002.parquet"))
    inputs = sorted(i for p in tokenized.rglob("*.parquet") for i in pq.read_table(p)["id"].to_pylist())

    runs = []
    for name in ("a", "b"):
        cfg = PackConfig(out_dir=str(tmp_path / name), shard_rows=4, val_fraction=0.3, seed=1)
        runs.append(pack_shards(cfg, str(tokenized), RAY))
    assert shard_files(tmp_path / "a") == shard_files(tmp_path / "b")  # ties are ordered deterministically
    ids = shard_ids(tmp_path / "a")
    assert sorted(i for split in ids.values() for shard in split for i in shard) == inputs
    train = {i for shard in ids["train"] for i in shard}
    assert not train & {i for shard in ids["val"] for i in shard}  # a duplicated id stays in one split
    assert runs[0]["duplicate_ids"] == 5 == json.loads((tmp_path / "a" / "manifest.json").read_text())["duplicate_ids"]


def test_val_split_is_stable_when_the_corpus_grows(ray_local, tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    write_tokenized_dir(small, 60, 10, 10, parts=2)
    write_tokenized_dir(large, 240, 40, 40, parts=3)  # a superset: ids are hashes of (modality, i)
    val = {}
    for name, root in (("small", small), ("large", large)):
        pack_shards(PackConfig(out_dir=str(tmp_path / f"out-{name}"), shard_rows=8, val_fraction=0.25), str(root), RAY)
        val[name] = {i for shard in shard_ids(tmp_path / f"out-{name}")["val"] for i in shard}
    small_ids = {i for p in small.rglob("*.parquet") for i in pq.read_table(p)["id"].to_pylist()}
    assert val["small"] == val["large"] & small_ids and len(val["small"]) >= 10


@pytest.mark.parametrize("shard_rows", [1, 7, 16, 50, 500])
def test_shard_sizes_and_order_are_those_of_a_global_sort(ray_local, tokenized, tmp_path, shard_rows):
    """The stated bound: every shard holds exactly shard_rows rows but the last of each split
    (1..shard_rows); shards in order are the split sorted by key (ties by id)."""
    out = tmp_path / "out"
    pack_shards(PackConfig(out_dir=str(out), shard_rows=shard_rows, val_fraction=0.2, seed=5), tokenized, RAY)
    for shards in shard_ids(out).values():
        sizes = [len(s) for s in shards]
        assert all(n == shard_rows for n in sizes[:-1]) and 1 <= sizes[-1] <= shard_rows
        flat = [i for s in shards for i in s]
        assert flat == sorted(flat, key=lambda i: (hash_key(5, i), i))


def test_driver_holds_no_per_row_plan(ray_local, tmp_path, monkeypatch):
    """Structural: the driver never reads or hashes a row, and its plan (inputs, key-range
    counts, shard specs) has the same size for 8x the rows in as many parts and shards."""
    from pipelines import pack
    from pipelines.pack import tasks

    def refuse(*args, **kwargs):
        raise AssertionError("the driver read or hashed rows")

    plans = []
    real_plan = pack.shard_plan

    def spy(cfg, inputs, counts):
        shards = real_plan(cfg, inputs, counts)
        plans.append((inputs, counts, shards))
        return shards

    monkeypatch.setattr(pack, "shard_plan", spy)
    monkeypatch.setattr(tasks, "route", refuse)  # workers import their own, unpatched module
    monkeypatch.setattr(storage, "read_parquet", refuse)
    for scale in (1, 8):
        root = tmp_path / f"tok{scale}"
        write_tokenized_dir(root, 100 * scale, 0, 0, parts=4)
        metrics = pack_shards(PackConfig(out_dir=str(tmp_path / f"out{scale}"), shard_rows=10 * scale,
                                         val_fraction=0.1), str(root), RAY)
        assert metrics["rows"] == 100 * scale
    sizes = [len(inputs.parts) + counts.size + len(shards) for inputs, counts, shards in plans]
    bound = [(pack.RANGES_PER_SHARD + 1) * (len(inputs.parts) + len(shards)) for inputs, _, shards in plans]
    assert sizes[0] == sizes[1] and all(n <= b for n, b in zip(sizes, bound)) and sizes[1] < 800 / 4
    assert all(isinstance(v, (int, str, tuple)) for inputs, _, _ in plans for v in vars(inputs).values())


def kill_when(code: str, ready, timeout: float = 300) -> bool:
    """Run ``code`` in a fresh Python (its own local Ray); SIGKILL its whole process group as
    soon as ``ready()``. Returns whether it was still running when killed."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=project_env(),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.02)
    running = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return running


@pytest.mark.slow
@pytest.mark.parametrize("kill_point", ["scatter", "gather"])
def test_sigkill_then_rerun_gives_the_same_shards(ray_local, tokenized, tmp_path, kill_point):
    cfg = {"shard_rows": 3, "val_fraction": 0.2}
    pack_shards(PackConfig(out_dir=str(tmp_path / "reference"), **cfg), tokenized, RAY)
    out = tmp_path / "killed"
    code = (f"from pipelines.pack import PackConfig, pack_shards; from pipelines.common.ray_session import RayConfig; "
            f"pack_shards(PackConfig(out_dir={str(out)!r}, **{cfg!r}), {tokenized!r}, RayConfig(num_cpus=4))")
    scatter, train = out / ".scatter", out / "train"
    ready = {"scatter": lambda: scatter.exists() and any(p.suffix == ".counts" for p in scatter.rglob("*")),
             "gather": lambda: train.exists() and any(p.suffix == ".parquet" for p in train.iterdir())}[kill_point]
    assert kill_when(code, ready), "pack finished before the kill point"
    assert not (out / "manifest.json").exists()  # a killed run never shows a final manifest

    metrics = pack_shards(PackConfig(out_dir=str(out), **cfg), tokenized, RAY)
    assert shard_files(out) == shard_files(tmp_path / "reference")
    assert metrics["shards_written"] + metrics["shards_reused"] == metrics["shards"]


def test_config_values_are_checked():
    from pipelines.common.configs import ParamsError, build

    with pytest.raises(ParamsError, match="pack.shard_rows"):
        build(PackConfig, {"out_dir": "unused", "shard_rows": 0}, "pack")
    with pytest.raises(ParamsError, match="pack.compression: 'brotli' is not allowed"):
        build(PackConfig, {"out_dir": "unused", "compression": "brotli"}, "pack")
    with pytest.raises(ParamsError, match="pack.shards: unknown key"):
        build(PackConfig, {"out_dir": "unused", "shards": 3}, "pack")
