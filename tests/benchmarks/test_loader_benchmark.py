"""Smoke test of benchmarks.loader at a tiny size: it builds its shards, times every
(batch, loader) row and derives cores per GPU; it never asserts a speed (RESULTS.md)."""
from __future__ import annotations

from benchmarks import loader


def test_loader_benchmark_quick_reports_every_row(capsys):
    result = loader.main(["--quick"])
    out = capsys.readouterr().out
    assert "samples/CPU-s" in out and "loader cores per GPU" in out
    rows = {(r["mix"], r["loader"]) for r in result["results"]}
    assert rows == {(m, k) for m in ("pair", "image", "mixed") for k in ("1 thread", "2 processes", "2 threads")}
    for r in result["results"]:
        assert r["samples"] == 2 * 6 and r["samples_per_s"] > 0 and r["samples_per_cpu_s"] > 0
        assert set(r["cores_per_gpu"]) == set(loader.GPU_RATES)
    assert set(result["cores_per_gpu"]) == {"pair", "image", "mixed"}
    assert all(n >= 1 for needed in result["cores_per_gpu"].values() for n in needed.values())
    assert len(result["rows"]) == 9 and all(r["per_core"] > 0 for r in result["rows"])  # gpu_suite's block


def test_synthetic_shards_have_the_base_geometry(tmp_path):
    args = loader.parse_args(["--rows", "6", "--shard-rows", "9", "--base-images", "2"])
    index, png_kb = loader.synthetic_shards(str(tmp_path), args)
    assert len(index.paths) == 2 and all(index.total(m) == 6 for m in ("text", "image", "pair"))
    from pipelines.common.shards import ShardRowReader

    row = ShardRowReader(index, "pair").rows_of(0)[0]
    assert len(row["visual_tokens"]) == 196 and 32 <= len(row["text_ids"]) <= 64
    assert png_kb > 20  # photo-like, not a flat synthetic scene
