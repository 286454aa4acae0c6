"""Cluster mode: the data stages on a real multi-node Ray cluster give the single-node bytes.

A head and two worker nodes (three raylets, three object stores) run on this machine over
loopback; the driver joins them with RayConfig(address=...) as a Ray Job would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipelines.common import storage
from pipelines.demo_data import DemoDataConfig, generate_demo_data
from tests.scale.ray_cluster import PROJECT_ROOT, ray_cluster

pytestmark = pytest.mark.slow

TINY_DEMO = dict(num_pairs=40, num_images=20, max_text_docs=60, num_retrieval_train=0, num_retrieval_test=0,
                 num_probe_train=0, num_probe_val=0, pairs_per_tar=20, text_docs_per_file=30)


def drive(tmp_path, name: str, spec: dict, env: dict | None = None) -> dict:
    """Run tests.scale.data_driver in its own process (its own Ray connection); return its report."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"work": str(tmp_path / name), **spec}))
    proc = subprocess.run([sys.executable, "-m", "tests.scale.data_driver", str(path)], cwd=PROJECT_ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def relative_files(root: str) -> dict[str, str]:
    return {os.path.relpath(p, root): storage.sha256_file(p) for p in storage.list_files(root)}


def test_clean_tokenize_pack_on_a_cluster_match_single_node(tmp_path):
    demo = str(tmp_path / "demo")
    generate_demo_data(DemoDataConfig(out_dir=demo, **TINY_DEMO))
    with ray_cluster(worker_nodes=2, cpus_per_node=2) as starting:
        # the single-node reference runs while the cluster's nodes start (in their own RAY_TMPDIR)
        single = drive(tmp_path, "single", {"demo": demo, "address": None, "dashboard": None, "tokenizers": None})
        cluster = starting.ready()
        multi = drive(tmp_path, "multi", {"demo": demo, "address": cluster.address, "dashboard": cluster.dashboard,
                                          "tokenizers": single["tokenizers"]}, env=cluster.env)
    print("\nsingle-node seconds:", single["seconds"], "\nmulti-node seconds:", multi["seconds"],
          "\ntasks per node:", multi["tasks_per_node"])

    assert single["nodes"] == 1 and multi["nodes"] == 3
    # the work really spread: several nodes ran tasks of the driver's job
    assert len(multi["tasks_per_node"]) >= 2, multi["tasks_per_node"]
    for stage in ("clean", "tokenized", "shards"):
        a, b = relative_files(single["dirs"][stage]), relative_files(multi["dirs"][stage])
        assert a and a == b, f"{stage}: cluster output differs from the single-node output"
    manifest = storage.read_json(os.path.join(multi["dirs"]["shards"], "manifest.json"))
    assert manifest["rows"] > 0 and set(manifest["rows_by_modality"]) == {"text", "image", "pair"}
    assert all(manifest["rows_by_modality"][m] > 0 for m in ("text", "image", "pair"))
