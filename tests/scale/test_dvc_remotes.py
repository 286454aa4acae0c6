"""DVC remotes: every artifact of the session's tiny `dvc repro` goes to a local-folder remote
(the repo's default) and to an S3 remote (the loopback server), and a fresh clone that pulls
them runs `dvc repro` without recomputing anything. (Stages joining one `ray start --head`
node are tested in test_cluster.py.)"""
from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest
import yaml

from pipelines.common import storage
from tests.project import DATA_STAGES, clone, run, stages_run

pytestmark = pytest.mark.slow

GIT = ("git", "-c", "user.email=t@t", "-c", "user.name=t")


def lock_outs(project: str, stages=None) -> list[str]:
    """Every out DVC recorded for ``stages`` (all if None; cached artifacts and cache: false
    metrics alike)."""
    lock = yaml.safe_load(open(os.path.join(project, "dvc.lock")))
    return sorted(o["path"] for name, stage in lock["stages"].items() if stages is None or name in stages
                  for o in stage.get("outs", []))


def tree_hashes(root: str, rel_paths: list[str]) -> dict[str, str]:
    files = {}
    for rel in rel_paths:
        for path in storage.list_files(os.path.join(root, rel)):
            files[os.path.relpath(path, root)] = storage.sha256_file(path)
    return files


def folder_bytes(path: str) -> tuple[int, int]:
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs]
    return len(sizes), sum(sizes)


def s3_bytes(uri: str) -> tuple[int, int]:
    fs, _ = storage.filesystem(uri)
    sizes = [fs.get_file_info(f[len("s3://"):]).size for f in storage.list_files(uri)]
    return len(sizes), sum(sizes)


def clone_pull_repro(origin: str, dest: str, remote: str) -> dict:
    """git clone -> dvc pull -r remote -> dvc repro pack; returns timings and what ran."""
    subprocess.run(["git", "clone", "-q", origin, dest], check=True)
    start = time.perf_counter()
    pulled = run(dest, "dvc", "pull", "-r", remote, "--with-deps", "pack")  # pretrain and later never ran
    pull_s = time.perf_counter() - start
    repro = run(dest, "dvc", "repro", "pack")
    status = run(dest, "dvc", "status", "--with-deps", "pack")
    return {"pull_s": round(pull_s, 1), "pulled": pulled.stdout, "ran": stages_run(repro.stdout),
            "status": status.stdout}


def test_push_pull_to_local_and_s3_remotes_then_repro_reuses(s3_env, tiny_repro, tmp_path):
    project = clone(tiny_repro.root, str(tmp_path / "project"))  # outputs, dvc.lock and DVC cache
    s3_remote = f"s3://beit3/dvc-{uuid.uuid4().hex[:8]}"
    run(project, "dvc", "remote", "add", "s3", s3_remote)
    run(project, "dvc", "remote", "modify", "s3", "endpointurl", s3_env["AWS_ENDPOINT_URL"])
    run(project, "git", "add", "-A")  # the remote's config
    run(project, *GIT, "commit", "-qm", "s3 remote")
    outs = lock_outs(project)
    assert {"data/demo", "data/clean", "data/text_tokenizer", "data/visual_tokenizer", "data/tokenized",
            "data/shards", "metrics/pack.json"} <= set(outs)

    # the repo's default remote: a local folder (../../dvc-storage from .dvc/, i.e. beside the repo)
    local_store = str(tmp_path / "dvc-storage")
    timings = {}
    for remote in ("local", "s3"):
        start = time.perf_counter()
        pushed = run(project, "dvc", "push", "-r", remote).stdout
        timings[f"push_{remote}_s"] = round(time.perf_counter() - start, 1)
        assert "pushed" in pushed, pushed
    local_files, local_size = folder_bytes(local_store)
    s3_files, s3_size = s3_bytes(s3_remote)
    assert local_files == s3_files > 0 and local_size == s3_size
    # a second push has nothing left to send
    assert "Everything is up to date" in run(project, "dvc", "push", "-r", "s3").stdout

    pulled_outs = lock_outs(project, DATA_STAGES)  # the clones pull and check `pack` and its inputs
    expected = tree_hashes(project, pulled_outs)
    for remote in ("local", "s3"):
        result = clone_pull_repro(project, str(tmp_path / f"clone-{remote}"), remote)
        timings[f"pull_{remote}_s"] = result["pull_s"]
        assert result["ran"] == [], f"repro after pulling from {remote} recomputed {result['ran']}"
        assert "up to date" in result["status"], result["status"]
        assert tree_hashes(str(tmp_path / f"clone-{remote}"), pulled_outs) == expected
    print(f"\nremote: {local_files} files, {local_size / 1e6:.2f} MB (local folder and s3 alike); {timings}")
