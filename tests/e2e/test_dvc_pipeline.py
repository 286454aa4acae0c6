"""The real pipeline end to end: `dvc repro` in a fresh git + DVC repo on a tiny demo.

Real Ray, real sentencepiece, real VQ-KD training, real Ray Train steps; only the
sizes are shrunk (tests/project.py TINY) so CI stays within minutes. The first run is
the session's `tiny_repro` (tests/conftest.py), which the reliability tests share; the
tests here change a copy of it.
"""
import json
import os

import pytest

from tests.project import DATA_STAGES, STAGES, clone, run, stages_run, update_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tiny_repro, tmp_path_factory):
    """A copy of the finished first run (outputs, DVC cache, git history) for the tests to change."""
    return clone(tiny_repro.root, str(tmp_path_factory.mktemp("e2e") / "project"))


def test_repro_runs_every_stage_and_writes_metrics(tiny_repro, project):
    assert list(tiny_repro.durations) == STAGES
    for stage in STAGES[:-1]:
        assert os.path.exists(os.path.join(project, "metrics", f"{stage}.json")), stage
    clean = json.load(open(os.path.join(project, "metrics", "clean.json")))
    for name, src in clean["sources"].items():
        assert src["rows_in"] == src["kept"] + src["rejected"], name
    evaluation = json.load(open(os.path.join(project, "metrics", "evaluate.json")))
    for key in ("mlm_acc", "mim_acc"):
        assert 0.0 <= evaluation[key] <= 1.0
    for init in ("pretrained", "random_init"):
        assert {"i2t_r1", "t2i_r1"} <= set(evaluation["retrieval"][init])
        assert 0.0 <= evaluation["probe"][init]["top1"] <= 1.0
    assert os.path.exists(os.path.join(project, "report", "index.html"))


def test_second_repro_is_a_no_op(project):
    out = run(project, "dvc", "repro").stdout
    assert stages_run(out) == []
    assert "up to date" in out.lower() or "didn't change" in out.lower()


def test_exp_run_changing_lr_reruns_only_pretrain_and_downstream(project):
    """The README's experiment command: `dvc exp run -S pretrain.lr=...` reruns pretrain and
    what reads its model (evaluate, report), no data stage."""
    out = run(project, "dvc", "exp", "run", "-S", "pretrain.lr=5e-4").stdout
    assert stages_run(out) == ["pretrain", "evaluate", "report"]
    assert not set(stages_run(out)) & set(DATA_STAGES)
    shown = run(project, "dvc", "exp", "show", "--json").stdout
    assert '"lr": 0.0005' in shown or '"lr": 5e-4' in shown or '"lr": 5e-04' in shown


def test_changing_shard_rows_reruns_pack_and_marks_only_downstream_stale(project):
    """After a pack param change `dvc repro pack` reruns pack alone (nothing upstream), and
    DVC then lists exactly the stages that read its outputs as stale. (Runs last: it leaves
    the project changed; rerunning pretrain and evaluate here would repeat the lr test.)"""
    update_params(project, {"pack": {"shard_rows": 30}})
    assert stages_run(run(project, "dvc", "repro", "pack").stdout) == ["pack"]
    manifest = json.load(open(os.path.join(project, "data", "shards", "manifest.json")))
    assert manifest["shard_rows"] == 30 and max(shard["rows"] for shard in manifest["shards"]) <= 30
    stale = json.loads(run(project, "dvc", "status", "--json").stdout)
    assert set(stale) == {"pretrain", "evaluate", "report"}  # all three read data/shards
