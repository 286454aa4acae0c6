"""Pretraining with its checkpoints on object storage: `pretrain.checkpoint_dir: s3://...`
through `dvc repro`, fresh, SIGKILLed, and resumed from the checkpoints on the loopback S3
server (the `s3_env` fixture), in a clone of the session's tiny `dvc repro`. This is also the
test of a killed pretrain stage's rerun (local checkpoints resume through the same code: the
exact-resume tests in tests/pipelines/test_pretrain.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid

import pytest

from pipelines.common import storage
from tests.project import clone, git_commit, project_env, stages_run, update_params
from tests.reliability.processes import committed_step, kill, log_tail, wait_for

pytestmark = pytest.mark.slow


def repro(project: str, log: str) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(["dvc", "repro", "pretrain"], cwd=project, env=project_env(), start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)


def test_checkpoints_on_s3_survive_a_kill_and_the_rerun_resumes(s3_env, tiny_repro, tmp_path):
    project = clone(tiny_repro.root, str(tmp_path / "project"))
    checkpoints = f"s3://beit3/run-{uuid.uuid4().hex[:8]}/checkpoints"
    update_params(project, {"pretrain": {"checkpoint_dir": checkpoints, "steps": 30, "checkpoint_every": 3,
                                         "keep_checkpoints": 2, "log_samples": True}})
    git_commit(project, "checkpoints on s3")
    log = str(tmp_path / "repro.log")

    first = repro(project, log)
    assert wait_for(lambda: committed_step(checkpoints) >= 3, first, timeout=600), log_tail(log)
    kill(first, signal.SIGKILL)
    interrupted_at = committed_step(checkpoints)
    assert 3 <= interrupted_at < 30
    assert not os.path.exists(os.path.join(project, "metrics", "pretrain.json")) or \
        json.load(open(os.path.join(project, "metrics", "pretrain.json")))["steps"] != 30

    second = repro(project, log)
    assert second.wait(timeout=900) == 0, log_tail(log)
    with open(os.path.join(project, "metrics", "pretrain.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == 30 and summary["resumed_from_step"] >= interrupted_at
    assert f"resumed run {summary['run_name']} at step" in log_tail(log, 200_000)
    shards = [p for p in storage.list_files(checkpoints) if p.endswith(".distcp")]  # DCP: every rank's shard
    assert shards and all(storage.exists(storage.join(p.rsplit("/", 1)[0], ".metadata")) for p in shards)
    assert os.path.isfile(os.path.join(project, "models", "pretrain", "model.safetensors"))
    with open(os.path.join(project, "models", "pretrain", "samples.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(1, 31))  # the killed run's steps from the checkpoint, no step twice or skipped
    status = subprocess.run(["dvc", "status", "pretrain"], cwd=project, env=project_env(), capture_output=True,
                            text=True, check=True).stdout
    assert stages_run(status) == [] and "changed" not in status
