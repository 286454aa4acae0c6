"""A Ray driver that runs the data stages (clean -> tokenizers -> tokenize -> pack) through the
pipelines functions, as a Ray Job's entrypoint would: ``python -m tests.scale.data_driver SPEC``.

SPEC is a JSON file: {"work": dir, "demo": dir, "address": null | "host:port", "dashboard":
null | url, "tokenizers": null | {"text": dir, "visual": dir}}. Every path is absolute: on a
cluster, tasks run in each node's own working directory. The last stdout line is a JSON
report: seconds per stage and, on a cluster, how many tasks each node ran.
"""
from __future__ import annotations

import json
import os
import sys
import time

import ray

from pipelines.clean import CleanConfig, clean_sources
from pipelines.clean.sources import SourceConfig
from pipelines.common.ray_session import RayConfig, ray_session
from pipelines.pack import PackConfig, pack_shards
from pipelines.text_tokenizer import TextTokenizerConfig, train_text_tokenizer
from pipelines.tokenize import TokenizeConfig, tokenize_corpus
from pipelines.visual_tokenizer import VisualTokenizerConfig, train_visual_tokenizer

# Tiny settings: several parts and shards per stage, so work can spread over the nodes.
CLEAN = {"part_rows": 25, "files_per_unit": 8}
TEXT_TOKENIZER = {"vocab_size": 200}
VISUAL_TOKENIZER = {"steps": 10, "warmup_steps": 4, "holdout": 8, "batch_size": 16, "probe_dir": None,
                    "num_threads": 1, "dead_code_steps": 5}
TOKENIZE = {"num_actors": 2, "batch_size": 16}
PACK = {"shard_rows": 40}


def demo_sources(demo: str) -> list[SourceConfig]:
    return [SourceConfig("demo_text", "text", "jsonl", os.path.join(demo, "text")),
            SourceConfig("demo_images", "image", "folder", os.path.join(demo, "images")),
            SourceConfig("demo_pairs", "pair", "webdataset", os.path.join(demo, "pairs"))]


def run(spec: dict) -> dict:
    work, ray_cfg = spec["work"], RayConfig(address=spec["address"], num_cpus=4)
    dirs = {name: os.path.join(work, name) for name in ("clean", "text_tokenizer", "visual_tokenizer",
                                                          "tokenized", "shards")}
    seconds = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        fn(*args)
        seconds[name] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    with ray_session(ray_cfg):  # one connection; the stages' own ray_session calls reuse it
        seconds["connect"] = round(time.perf_counter() - start, 2)
        nodes = len([n for n in ray.nodes() if n["Alive"]])
        timed("clean", clean_sources, demo_sources(spec["demo"]), CleanConfig(out_dir=dirs["clean"], **CLEAN), ray_cfg)
        tokenizers = spec["tokenizers"]
        if tokenizers is None:
            timed("text_tokenizer", train_text_tokenizer,
                  TextTokenizerConfig(out_dir=dirs["text_tokenizer"], **TEXT_TOKENIZER), dirs["clean"], ray_cfg)
            timed("visual_tokenizer", train_visual_tokenizer,
                  VisualTokenizerConfig(out_dir=dirs["visual_tokenizer"], **VISUAL_TOKENIZER), dirs["clean"], ray_cfg)
            tokenizers = {"text": dirs["text_tokenizer"], "visual": dirs["visual_tokenizer"]}
        timed("tokenize", tokenize_corpus, TokenizeConfig(out_dir=dirs["tokenized"], **TOKENIZE), dirs["clean"],
              tokenizers["text"], tokenizers["visual"], ray_cfg)
        timed("pack", pack_shards, PackConfig(out_dir=dirs["shards"], **PACK), dirs["tokenized"], ray_cfg)
        tasks = tasks_per_node(spec["dashboard"]) if spec["dashboard"] else {}
    return {"nodes": nodes, "seconds": seconds, "tasks_per_node": tasks, "dirs": dirs, "tokenizers": tokenizers}


def tasks_per_node(dashboard: str) -> dict[str, int]:
    """Finished tasks and actor calls of this job per node (Ray's state API on the head)."""
    from ray.util.state import list_tasks

    job = ray.get_runtime_context().get_job_id()
    counts: dict[str, int] = {}
    for task in list_tasks(address=dashboard, filters=[("job_id", "=", job)], limit=10000, detail=True,
                           raise_on_missing_output=False):
        if task.node_id:
            counts[task.node_id] = counts.get(task.node_id, 0) + 1
    return counts


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        report = run(json.load(f))
    print(json.dumps(report))
