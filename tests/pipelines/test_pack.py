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

    metrics = pack_shards(cfg("a"), tokenized, RAY)  # small input: shuffled in Ray's object store
    pack_shards(cfg("b", in_memory_mb=0), tokenized, RAY)  # spilled to out_dir/.spill
    files = shard_files(tmp_path / "a")
    assert files == shard_files(tmp_path / "b")  # shards and manifest, byte for byte
    assert not (tmp_path / "b" / ".spill").exists() and "manifest.partial.json" not in files

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
    cfg = dict(shard_rows=3, val_fraction=0.2, in_memory_mb=0.0)  # the spill path: a visible scatter phase
    pack_shards(PackConfig(out_dir=str(tmp_path / "reference"), **cfg), tokenized, RAY)
    out = tmp_path / "killed"
    code = (f"from pipelines.pack import PackConfig, pack_shards; from pipelines.common.ray_session import RayConfig; "
            f"pack_shards(PackConfig(out_dir={str(out)!r}, **{cfg!r}), {tokenized!r}, RayConfig(num_cpus=4))")
    spill, train = out / ".spill", out / "train"
    ready = {"scatter": lambda: spill.exists() and any(spill.iterdir()),
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
