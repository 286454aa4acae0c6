"""Smoke test of benchmarks.evaluate_memory at a tiny size: it builds the sets, the tokenizer
and the model, runs each scale in its own process and reports peak RSS; it never asserts
the ratio (the target lives in the benchmark's output and RESULTS.md)."""
from __future__ import annotations

import json
import os

from benchmarks import evaluate_memory


def test_evaluate_memory_tiny(tmp_path, capsys):
    result = evaluate_memory.main(["--scales", "1,2", "--train", "16", "--test", "8", "--probe-train", "15",
                                   "--probe-val", "9", "--steps", "1", "--batch-size", "4", "--probe-steps", "2",
                                   "--dim", "32", "--depth", "1", "--tmp", str(tmp_path)])
    out = capsys.readouterr().out
    assert "peak RSS x2 / x1" in out and "target <= 1.3x" in out
    for scale, factor in ((1, 1), (2, 2)):
        run = result["runs"][scale]
        assert run["metrics"]["retrieval"]["data"] == {"train": 16 * factor, "test": 8 * factor}
        assert run["metrics"]["probe"]["data"]["train"] == 15 * factor
        assert run["ru_maxrss"] > 0 and run["sampled_rss"] > 0
    assert result["rss_ratio"] > 0
    # The x2 set links each 1x file twice under new names, captions kept.
    with open(os.path.join(tmp_path, "x2", "retrieval", "dataset.json")) as f:
        names = [e["filename"] for e in json.load(f)["images"]]
    assert len(names) == len(set(names)) == 48 and names[0].startswith("c0-") and names[-1].startswith("c1-")
