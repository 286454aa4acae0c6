"""A Ray driver that runs pretraining through pipelines.pretrain.run_pretraining, as a Ray
Job's entrypoint would: ``python -m tests.scale.pretrain_driver SPEC``.

SPEC is a JSON file: {"params": the `pretrain` params section (absolute paths), "shards":
dir, "text_tokenizer": dir, "address": null | "host:port"}. The last stdout line is a JSON
report: the metrics, the training log and the nodes the train workers ran on.
"""
from __future__ import annotations

import json
import sys

from pipelines.common.configs import build
from pipelines.common.ray_session import RayConfig, ray_session
from pipelines.common.train_csv import read_csv
from pipelines.pretrain import PretrainConfig, run_pretraining


def worker_nodes() -> list[str]:
    """Node ids of the run's train workers (dead actors stay listed for a while)."""
    import ray
    from ray.util.state import list_actors

    # this driver's own cluster: other Ray instances may run on the machine
    actors = list_actors(address=ray.get_runtime_context().gcs_address, limit=1000,
                         filters=[("class_name", "=", "RayTrainWorker")], raise_on_missing_output=False)
    return sorted({a.node_id for a in actors})


def main(path: str) -> None:
    with open(path) as f:
        spec = json.load(f)
    cfg = build(PretrainConfig, spec["params"], "pretrain")
    ray_cfg = RayConfig(address=spec["address"], num_cpus=4)
    with ray_session(ray_cfg):  # held open after the run, for the state API
        summary = run_pretraining(cfg, spec["shards"], spec["text_tokenizer"], ray_cfg)
        nodes = worker_nodes()
    print(json.dumps({"summary": summary, "log": read_csv(cfg.plots_path), "worker_nodes": nodes}))


if __name__ == "__main__":
    main(sys.argv[1])
