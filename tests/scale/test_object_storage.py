"""Object storage: the data stages read sources from s3:// and write their outputs there;
DVC versions each remote output through its local manifest (pipelines/common/remote_outputs.py).

A real S3-compatible server (moto_server, the `s3_env` fixture) runs on loopback; the
stages run with `dvc repro` in a throw-away copy of the project, as a user would, each
joining one `ray start --head` node (ray.address) rather than starting a Ray of its own.
"""
from __future__ import annotations

import json
import os
import uuid

import pytest
import yaml

from pipelines.common import remote_outputs, storage
from pipelines.common.schema import SHARD_SCHEMA
from tests.project import copy_project, run, stages_run, update_params
from tests.scale.ray_cluster import ray_head
from tests.scale.s3_sources import use_s3_sources
from tests.scale.tiny import TINY_PARAMS

pytestmark = pytest.mark.slow


def read_manifest(project: str, out: str) -> dict:
    path = os.path.join(project, out, remote_outputs.MANIFEST)
    assert os.listdir(os.path.join(project, out)) == [remote_outputs.MANIFEST]
    return json.loads(open(path).read())


def test_data_stages_on_s3_are_versioned_by_manifests(s3_env, tmp_path):
    project = copy_project(str(tmp_path / "project"))
    prefix = f"s3://beit3/run-{uuid.uuid4().hex[:8]}"
    outs = {"clean": f"{prefix}/clean", "tokenize": f"{prefix}/tokenized", "pack": f"{prefix}/shards"}
    # DVC tracks the s3:// sources themselves as the clean stage's dependency
    use_s3_sources(project, prefix, {**TINY_PARAMS, **{stage: {**TINY_PARAMS.get(stage, {}), "remote_dir": uri}
                                                       for stage, uri in outs.items()}})
    with ray_head(num_cpus=TINY_PARAMS["ray"]["num_cpus"], cwd=project) as head:
        # one Ray for every stage run below: each stage joins it instead of starting its own
        update_params(project, {"ray": {"address": head.address}})
        check_s3_run(project, prefix, outs, tmp_path, head.env)


def check_s3_run(project: str, prefix: str, outs: dict, tmp_path, env: dict) -> None:
    first = run(project, "dvc", "repro", "pack", env=env)
    assert stages_run(first.stdout) == ["clean", "text_tokenizer", "visual_tokenizer", "tokenize", "pack"]

    # every remote output is pinned by a local manifest of content-addressed objects
    manifests = {stage: read_manifest(project, out)
                 for stage, out in (("clean", "data/clean"), ("tokenize", "data/tokenized"), ("pack", "data/shards"))}
    for stage, manifest in manifests.items():
        assert manifest["out_dir"] == outs[stage] and manifest["store"] == f"{prefix}/.cas"
        listed = storage.list_files(outs[stage])
        assert [f["path"] for f in manifest["files"]] == [p[len(outs[stage]) + 1:] for p in listed]
        for entry in manifest["files"]:
            assert storage.sha256_file(entry["uri"]) == entry["sha256"]
            assert storage.sha256_file(storage.join(outs[stage], entry["path"])) == entry["sha256"]
    shards = storage.read_json(f"{outs['pack']}/manifest.json")
    assert shards["rows"] > 0 and all(shards["rows_by_modality"][m] > 0 for m in ("text", "image", "pair"))
    table = storage.read_parquet(storage.join(outs["pack"], shards["shards"][0]["path"]))
    assert table.schema.equals(SHARD_SCHEMA, check_metadata=False)
    pack_metrics = json.loads(open(os.path.join(project, "metrics/pack.json")).read())
    assert pack_metrics["remote_output"]["files"] == len(manifests["pack"]["files"])
    lock = yaml.safe_load(open(os.path.join(project, "dvc.lock")))
    assert f"{prefix}/sources" in [d["path"] for d in lock["stages"]["clean"]["deps"]]
    assert "data/shards" in [o["path"] for o in lock["stages"]["pack"]["outs"]]

    # nothing changed: nothing reruns
    assert stages_run(run(project, "dvc", "repro", "pack", env=env).stdout) == []

    # new shards (another shuffle seed): only pack reruns, its manifest changes, the old version stays readable
    update_params(project, {"pack": {"seed": 1}})
    assert stages_run(run(project, "dvc", "repro", "pack", env=env).stdout) == ["pack"]
    changed = read_manifest(project, "data/shards")
    assert {f["sha256"] for f in changed["files"]} != {f["sha256"] for f in manifests["pack"]["files"]}
    old = tmp_path / "old_shards"
    old.mkdir()
    (old / remote_outputs.MANIFEST).write_text(json.dumps(manifests["pack"]))
    assert remote_outputs.verify_output(str(old))  # the shards on s3 are the new ones now
    assert remote_outputs.restore_output(str(old)) > 0
    assert remote_outputs.verify_output(str(old)) == []

    # an edited source is a changed dependency
    storage.write_bytes(f"{prefix}/sources/text/extra.jsonl", b'{"id": "x", "text": "one more document here"}\n')
    status = run(project, "dvc", "status", "clean").stdout
    assert "modified" in status and f"{prefix}/sources" in status
