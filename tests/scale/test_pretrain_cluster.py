"""Pretraining on a real multi-node Ray cluster: two nodes with one train worker each give
the loss curve of one node with two workers (same world size, same data, masks and seeds)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.pipelines.pretrain_fixtures import tiny_corpus, tiny_pretrain_params  # noqa: F401  (fixture)
from tests.scale.ray_cluster import PROJECT_ROOT, ray_cluster

pytestmark = pytest.mark.slow

LOSSES = ("loss", "loss_text_mlm", "loss_image_mim", "loss_pair_mlm", "loss_pair_mim")


def drive(tmp_path, name: str, corpus: dict, params: dict, address: str | None, env: dict | None = None) -> dict:
    """Run tests.scale.pretrain_driver in its own process (its own Ray connection)."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"params": params, "shards": corpus["shards"],
                                "text_tokenizer": corpus["text_tokenizer"], "address": address}))
    proc = subprocess.run([sys.executable, "-m", "tests.scale.pretrain_driver", str(path)], cwd=PROJECT_ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{name} driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def losses(report: dict) -> torch.Tensor:
    return torch.tensor([[row[k] for k in LOSSES] for row in report["log"]])


def test_two_nodes_train_like_one_node_with_two_workers(tiny_corpus, tmp_path):  # noqa: F811
    # a worker takes a whole 2-CPU node, so the cluster's two workers land on two nodes
    def params(name: str) -> dict:
        return tiny_pretrain_params(str(tmp_path / name), num_workers=2, cpus_per_worker=2.0, steps=8,
                                    checkpoint_every=4)

    with ray_cluster(worker_nodes=1, cpus_per_node=2) as starting:
        # the single-node reference runs while the cluster's nodes start
        single = drive(tmp_path, "single", tiny_corpus, params("single"), None)
        cluster = starting.ready()
        multi = drive(tmp_path, "multi", tiny_corpus, params("multi"), cluster.address, env=cluster.env)
    assert len(single["worker_nodes"]) == 1 and len(multi["worker_nodes"]) == 2
    assert single["summary"]["steps"] == multi["summary"]["steps"] == 8
    assert single["summary"]["run_name"] == multi["summary"]["run_name"]
    assert torch.allclose(losses(multi), losses(single), rtol=1e-5)
