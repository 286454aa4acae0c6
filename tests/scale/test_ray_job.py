"""`dvc repro` submitted as a Ray Job, exactly as the README shows it, to a real head node
(`ray start --head` on loopback), with the DVC remote on the loopback S3 server.

The job's stages run with ``ray.address: null`` (the default params) and join the job's
cluster through the RAY_ADDRESS Ray sets for the job's driver; the checkout that submitted
the job then gets the job's dvc.lock from its logs and pulls its artifacts.
"""
from __future__ import annotations

import json
import os
import uuid

import pytest
import yaml

from pipelines.common import remote_outputs
from tests.project import PROJECT_ROOT, copy_project, run
from tests.scale.ray_cluster import ray_head
from tests.scale.s3_sources import use_s3_sources
from tests.scale.tiny import TINY_PARAMS

pytestmark = pytest.mark.slow

RECORD = "==run-record=="
GIT = ("git", "-c", "user.email=t@t", "-c", "user.name=t")


def job_entrypoint(targets: str = "") -> str:
    """The README's job command; ``targets`` narrows `dvc repro` (the README runs everything)."""
    repro = f"dvc repro {targets}".rstrip()
    return ("sh -c 'run=$(mktemp -d) && cp -a . \"$run\" && cd \"$run\" && dvc config --local core.no_scm true && "
            f"{{ dvc pull -r s3 --allow-missing; {repro} && dvc push -r s3 && echo {RECORD} && "
            "tar cz dvc.lock metrics $(ls -d plots 2>/dev/null) | base64; }'")


def fetch_record(dashboard: str, job_id: str) -> str:
    """The README's command that unpacks the job's dvc.lock and metrics into the checkout."""
    return f"ray job logs --address {dashboard} {job_id} | sed '1,/^{RECORD}$/d' | base64 -d | tar xz"


def test_readme_shows_the_tested_job_command():
    readme = open(os.path.join(PROJECT_ROOT, "README.md")).read()
    assert f"-- {job_entrypoint()}" in readme
    assert fetch_record("http://HEAD:8265", "beit3-run-1") in readme


def test_dvc_repro_as_a_ray_job_joins_the_cluster_and_its_artifacts_come_back(s3_env, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    project = copy_project(str(tmp_path / "project"))
    # As on a real cluster, data lives on object storage (a task's relative path would resolve in
    # its worker's own directory). ray.address stays null: the job's RAY_ADDRESS decides.
    prefix = f"s3://beit3/job-{uuid.uuid4().hex[:8]}"
    use_s3_sources(project, prefix, {**TINY_PARAMS, "clean": {**TINY_PARAMS["clean"], "remote_dir": f"{prefix}/clean"}})
    run(project, "dvc", "remote", "add", "s3", f"s3://beit3/dvc-job-{uuid.uuid4().hex[:8]}")
    run(project, "dvc", "remote", "modify", "s3", "endpointurl", s3_env["AWS_ENDPOINT_URL"])
    run(project, "git", "add", "-A")
    run(project, *GIT, "commit", "-qm", "tiny params, s3 remote")

    job_id = f"dvc-{uuid.uuid4().hex[:8]}"
    with ray_head(num_cpus=2) as head:
        runtime_env = json.dumps({"env_vars": {"AWS_ENDPOINT_URL": s3_env["AWS_ENDPOINT_URL"]}})
        submitted = run(project, "sh", "-c", f"ray job submit --address {head.dashboard} --submission-id {job_id} "
                        f"--working-dir . --runtime-env-json '{runtime_env}' -- {job_entrypoint('clean')}",
                        env={"RAY_ADDRESS": ""}, timeout=900)
        client = JobSubmissionClient(head.dashboard)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, submitted.stdout[-4000:]
        logs = client.get_job_logs(job_id)
        # a Ray driver inside the job (the clean stage, ray.address null) joined this cluster:
        # Ray files it under the submission; the entrypoint shell itself never connects
        info = client.get_job_info(job_id)
        assert info.driver_info is not None and info.driver_exit_code == 0, info
        run(project, "sh", "-c", fetch_record(head.dashboard, job_id))

    assert "Running stage 'clean'" in logs
    lock = yaml.safe_load(open(os.path.join(project, "dvc.lock")))
    assert "clean" in lock["stages"] and f"{prefix}/sources" in [d["path"] for d in lock["stages"]["clean"]["deps"]]
    metrics = json.loads(open(os.path.join(project, "metrics/clean.json")).read())
    run(project, "dvc", "pull", "-r", "s3", "clean")  # the README's job ran every stage; this one only clean
    status = run(project, "dvc", "status", "clean").stdout
    assert "up to date" in status, status  # the checkout now holds the job's run: nothing to recompute
    manifest = remote_outputs.read_manifest(os.path.join(project, "data/clean"))  # pulled from the remote
    assert manifest["out_dir"] == f"{prefix}/clean" and remote_outputs.verify_output(os.path.join(project, "data/clean")) == []
    assert any(f["path"].startswith("pair/part-") for f in manifest["files"])
    assert metrics["remote_output"]["files"] == manifest["count"]
