"""The real pipeline end to end: `dvc repro` in a fresh git + DVC repo on a tiny demo.

Real Ray, real sentencepiece, real VQ-KD training, real Ray Train steps; only the
sizes are shrunk so CI stays within minutes.
"""
import json
import os

import pytest

from tests.project import copy_project, run, stages_run, update_params

pytestmark = pytest.mark.slow

DATA_STAGES = ["demo_data", "clean", "text_tokenizer", "visual_tokenizer", "tokenize", "pack"]

TINY = {
    "demo_data": {"num_pairs": 120, "num_images": 40, "max_text_docs": 300,
                  "num_retrieval_train": 60, "num_retrieval_test": 30,
                  "num_probe_train": 36, "num_probe_val": 18, "pairs_per_tar": 60},
    "text_tokenizer": {"vocab_size": 400},
    "visual_tokenizer": {"steps": 30, "warmup_steps": 10, "batch_size": 16, "holdout": 20},
    "pack": {"shard_rows": 100},
    "pretrain": {"steps": 6, "batch": {"text": 4, "image": 4, "pair": 4}, "warmup_steps": 2,
                 "checkpoint_every": 3, "log_every": 1, "num_workers": 1},
    "evaluate": {"max_samples": 40,
                 "retrieval": {"steps": 3, "batch_size": 8, "warmup_steps": 1},
                 "probe": {"steps": 10}},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = copy_project(str(tmp_path_factory.mktemp("e2e") / "project"))
    update_params(root, TINY)
    run(root, "git", "commit", "-qam", "tiny params")
    return root


def _git_commit(project, message):
    run(project, "git", "add", "-A")
    run(project, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message)


def test_repro_runs_every_stage_and_writes_metrics(project):
    out = run(project, "dvc", "repro").stdout
    assert stages_run(out) == [*DATA_STAGES, "pretrain", "evaluate", "report"]
    for stage in [*DATA_STAGES, "pretrain", "evaluate"]:
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
    _git_commit(project, "first run")


def test_second_repro_is_a_no_op(project):
    out = run(project, "dvc", "repro").stdout
    assert stages_run(out) == []
    assert "up to date" in out.lower() or "didn't change" in out.lower()


def test_changing_shard_rows_reruns_only_pack_and_downstream(project):
    update_params(project, {"pack": {"shard_rows": 60}})
    out = run(project, "dvc", "repro").stdout
    ran = stages_run(out)
    assert ran[0] == "pack"
    assert not set(ran) & set(DATA_STAGES[:-1])
    _git_commit(project, "shard rows 60")


def test_exp_run_with_new_lr_reruns_only_pretrain_evaluate_report(project):
    out = run(project, "dvc", "exp", "run", "-S", "pretrain.lr=5e-4").stdout
    assert set(stages_run(out)) == {"pretrain", "evaluate", "report"}
    shown = run(project, "dvc", "exp", "show", "--json").stdout
    assert "5e-4" in shown or "0.0005" in shown
