"""Tiny params for running the real stages with `dvc repro` in a project copy (seconds of
work per stage; most of a stage's time is Ray starting)."""
from __future__ import annotations

TINY_PARAMS = {
    "ray": {"num_cpus": 4},
    "demo_data": {"num_pairs": 40, "num_images": 20, "max_text_docs": 60, "num_retrieval_train": 0,
                  "num_retrieval_test": 0, "num_probe_train": 0, "num_probe_val": 0, "pairs_per_tar": 20,
                  "text_docs_per_file": 30},
    "clean": {"part_rows": 40},
    "text_tokenizer": {"vocab_size": 200},
    "visual_tokenizer": {"steps": 10, "warmup_steps": 4, "holdout": 8, "batch_size": 16, "probe_dir": None,
                         "num_threads": 1, "dead_code_steps": 4},
    "tokenize": {"num_actors": 1, "batch_size": 32},
    "pack": {"shard_rows": 50},
}
