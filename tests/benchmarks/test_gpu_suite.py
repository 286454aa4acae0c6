"""The GPU suite as one command: a CPU smoke run fills every gpu-suite block of a copy of
RESULTS.md with a table (it asserts no speed: figures come from a GPU run)."""
from __future__ import annotations

import json
import os
import re
import shutil

from benchmarks import gpu_suite
from tests.project import PROJECT_ROOT


def test_quick_run_fills_every_block_of_a_results_copy(tmp_path):
    results = tmp_path / "RESULTS.md"
    shutil.copy(os.path.join(PROJECT_ROOT, "benchmarks", "RESULTS.md"), results)
    before = results.read_text()
    blocks = re.findall(r"<!-- gpu-suite:(\w+) -->", before)
    assert {"train_throughput", "giant_one_gpu", "vqkd_codes"} <= set(blocks)
    out = gpu_suite.main(["--quick", "--results", str(results), "--json", str(tmp_path / "figures.json")])
    assert all(figures is not None for figures, _, _ in out.values()), {k: v[1] for k, v in out.items()}
    after = results.read_text()
    for name in out:
        block = re.search(rf"<!-- gpu-suite:{name} -->(.*?)<!-- /gpu-suite:{name} -->", after, re.S).group(1)
        assert "TODO" not in block and "gpu_suite.sh" in block and re.search(r"\| [\d.]+ \|", block), name
    # text outside the blocks is untouched
    strip = lambda text: re.sub(r"<!-- gpu-suite:(\w+) -->.*?<!-- /gpu-suite:\1 -->", "", text, flags=re.S)  # noqa: E731
    assert strip(after).strip() == strip(before).strip() or set(out) - set(blocks)
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["train_throughput"][0][1]["impls"]["ours"]["samples_per_s"] > 0
