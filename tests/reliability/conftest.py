"""Shared by the reliability tests: one uninterrupted `dvc repro pack` on a tiny demo.

Its outputs are the reference every killed or disturbed run must reproduce byte for
byte, its dvc.lock is the first of the two runs the determinism test compares, and
its per-stage durations size the random kill times. Every project copy of a session
is cloned from one template, so all of them run the same code even while the working
tree is being edited.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

import pytest
import yaml

from tests.project import copy_project, project_env, run, update_params

DATA_STAGES = ["demo_data", "clean", "text_tokenizer", "visual_tokenizer", "tokenize", "pack"]

# Small enough for a busy 2-core machine, big enough that every stage has several parts.
TINY = {
    "demo_data": {"image_size": 64, "num_pairs": 60, "pairs_per_tar": 30, "num_images": 20,
                  "max_text_docs": 200, "text_docs_per_file": 100,
                  "num_retrieval_train": 4, "num_retrieval_test": 4,
                  "num_probe_train": 12, "num_probe_val": 6},
    "clean": {"part_rows": 50},
    "text_tokenizer": {"vocab_size": 300},
    "visual_tokenizer": {"image_size": 64, "steps": 20, "warmup_steps": 5, "batch_size": 16,
                         "holdout": 10},
    "tokenize": {"batch_size": 2, "num_actors": 1},  # small batches: a part takes long enough to be hit
    "pack": {"shard_rows": 50},
}


@dataclass(frozen=True)
class Reference:
    root: str                    # the project copy holding the reference outputs
    durations: dict[str, float]  # seconds each stage ran under `dvc repro`
    lock: dict                   # its dvc.lock


def clone(template: str, path: str) -> str:
    """A fresh project (sources, git and DVC repo, no outputs) copied from ``template``."""
    shutil.copytree(template, path, symlinks=True)
    return path


def repro_timed(root: str, target: str, timeout: float = 1500) -> dict[str, float]:
    """`dvc repro <target>` in ``root``; returns each stage's wall time (from when DVC
    announced it to when it announced the next one)."""
    proc = subprocess.Popen(["dvc", "repro", target], cwd=root, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=project_env({"PYTHONUNBUFFERED": "1"}))
    starts, lines, deadline = [], [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Running stage '"):
            starts.append((line.split("'")[1], time.time()))
        if time.time() > deadline:
            proc.kill()
            break
    rc = proc.wait()
    assert rc == 0, f"dvc repro {target} failed ({rc}):\n{''.join(lines)[-6000:]}"
    ends = [t for _, t in starts[1:]] + [time.time()]
    return {name: end - start for (name, start), end in zip(starts, ends)}


def read_lock(root: str) -> dict:
    with open(os.path.join(root, "dvc.lock")) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> str:
    """The project's sources copied once, with the TINY params committed."""
    root = copy_project(str(tmp_path_factory.mktemp("reliability") / "template"))
    update_params(root, TINY)
    run(root, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "tiny params")
    return root


@pytest.fixture(scope="session")
def reference(template, tmp_path_factory) -> Reference:
    root = clone(template, str(tmp_path_factory.mktemp("reliability") / "reference"))
    durations = repro_timed(root, "pack")
    assert list(durations) == DATA_STAGES, durations
    return Reference(root, durations, read_lock(root))
