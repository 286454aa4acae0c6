"""evaluate: the metrics/evaluate.json shape, pretrained vs random init, safe inputs."""
from __future__ import annotations

import json
import os

import pytest
import torch

from pipelines.common.configs import build
from pipelines.common.eval_data import read_image_folder, read_karpathy
from pipelines.common.ray_session import RayConfig
from pipelines.common.storage import write_json
from pipelines.common.task_files import load_exported_task
from pipelines.evaluate import EvaluateConfig, evaluate_model, masked_prediction, run_evaluation
from pipelines.evaluate.retrieval import recall_at
from pipelines.pretrain.checkpoints import export_from_checkpoint
from tests.pipelines.pretrain_fixtures import tiny_corpus, tiny_job, train_in_process  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/pipelines/conftest.py


@pytest.fixture(scope="module")
def tiny_model(tiny_corpus, tmp_path_factory) -> str:
    """A briefly pretrained tiny model, exported like the pretrain stage does."""
    root = tmp_path_factory.mktemp("tiny_model")
    _, saved = train_in_process(tiny_job(tiny_corpus, str(root), steps=6, checkpoint_every=6), keep_dir=str(root))
    export_from_checkpoint(saved[6], str(root / "model"))
    return str(root / "model")


def eval_config(corpus: dict, **overrides) -> EvaluateConfig:
    params = {
        "retrieval": {"dataset": os.path.join(corpus["eval"], "retrieval", "dataset.json"),
                      "steps": 6, "batch_size": 8, "warmup_steps": 2},
        "probe": {"root": os.path.join(corpus["eval"], "classification"), "steps": 30},
        "batch_size": 8, "threads": 1,
    }
    params.update(overrides)
    return build(EvaluateConfig, params, "evaluate")


def test_metrics_have_the_issue_shape_for_both_models(tiny_corpus, tiny_model):
    metrics = run_evaluation(eval_config(tiny_corpus), tiny_model, tiny_corpus["shards"], tiny_corpus["text_tokenizer"])
    json.dumps(metrics)  # what metrics/evaluate.json will hold
    for key in ("mlm_acc", "mim_acc", "caption_mlm_acc"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["masked_prediction"]["text_mlm"]["count"] > 0
    for model in ("pretrained", "random_init"):
        recalls = metrics["retrieval"][model]
        assert {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} <= set(recalls)
        assert all(0.0 <= recalls[k] <= 1.0 for k in recalls if "_r" in k)
        assert recalls["i2t_r1"] <= recalls["i2t_r5"] <= recalls["i2t_r10"]
        assert 0.0 <= metrics["probe"][model]["top1"] <= 1.0
    # Two different backbones really went through the same fine-tune.
    assert metrics["retrieval"]["pretrained"]["final_train_loss"] != metrics["retrieval"]["random_init"]["final_train_loss"]
    assert metrics["retrieval"]["data"] == {"train": 48, "test": 24}
    assert metrics["probe"]["data"]["classes"] == ["circle", "square", "triangle"]
    gain = metrics["pretraining_gain"]
    assert gain["probe_top1"] == pytest.approx(metrics["probe"]["pretrained"]["top1"] - metrics["probe"]["random_init"]["top1"], abs=1e-3)


def test_masked_prediction_scores_the_same_positions_every_run(tiny_corpus, tiny_model):
    cfg = eval_config(tiny_corpus)
    task = load_exported_task(tiny_model)
    first = masked_prediction(task, cfg, tiny_corpus["shards"], 1, torch.device("cpu"))
    assert first == masked_prediction(task, cfg, tiny_corpus["shards"], 1, torch.device("cpu"))
    # 16 val rows per modality; at most max_samples of them.
    few = masked_prediction(task, eval_config(tiny_corpus, max_samples=4), tiny_corpus["shards"], 1, torch.device("cpu"))
    assert few["masked_prediction"]["image_mim"]["count"] < first["masked_prediction"]["image_mim"]["count"]


def test_recall_counts_any_caption_of_an_image():
    # 3 images; captions 0,1 belong to image 0, caption 2 to image 1, caption 3 to image 2.
    owner = torch.tensor([0, 0, 1, 2])
    sims = torch.tensor([[0.1, 0.9, 0.0, 0.2],    # image 0: best caption 1 (its own) -> hit
                         [0.0, 0.1, 0.5, 0.8],    # image 1: best caption 3 (image 2's) -> miss at 1
                         [0.0, 0.0, 0.1, 0.9]])   # image 2: best caption 3 (its own) -> hit
    r = recall_at(sims, owner)
    assert r["i2t_r1"] == pytest.approx(2 / 3, abs=1e-4) and r["i2t_r5"] == 1.0
    # captions -> images: c0 -> image 0 (0.1 vs 0 vs 0: hit), c1 -> image 0 hit, c2 -> image 1 hit, c3 -> image 2 hit
    assert r["t2i_r1"] == 1.0
    assert r["mean_r1"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-4)


def test_karpathy_json_reads_flickr_style_entries_and_refuses_escapes(tmp_path):
    dataset = str(tmp_path / "dataset.json")
    write_json(dataset, {"images": [
        {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "one"}, {"raw": "two"}]},  # Flickr30k: no filepath
        {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "sentences": [{"raw": "three"}]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "train", "sentences": [{"raw": "  "}]},  # no caption
    ]})
    test = read_karpathy(dataset, None, ("test",))
    assert test.image_paths == [str(tmp_path / "a.jpg")] and test.caption_image == [0, 0]
    train = read_karpathy(dataset, "/data/coco", ("train", "restval"))
    assert train.image_paths == ["/data/coco/val2014/b.jpg"] and train.captions == ["three"]
    write_json(dataset, {"images": [{"filepath": "..", "filename": "secret.png", "split": "test",
                                     "sentences": [{"raw": "x"}]}]})
    with pytest.raises(ValueError, match="escapes"):
        read_karpathy(dataset, None, ("test",))


def test_image_folder_labels_follow_the_train_classes(tiny_corpus, tmp_path):
    root = os.path.join(tiny_corpus["eval"], "classification")
    paths, labels, classes = read_image_folder(root, "train")
    assert classes == ["circle", "square", "triangle"] and len(paths) == len(labels) == 36
    assert all(f"/{classes[y]}/" in p for p, y in zip(paths, labels))
    (tmp_path / "val" / "hexagon").mkdir(parents=True)
    (tmp_path / "val" / "hexagon" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="hexagon"):
        read_image_folder(str(tmp_path), "val", classes)


@pytest.mark.slow
def test_evaluate_runs_as_a_ray_task(tiny_corpus, tiny_model, ray_local):
    metrics = evaluate_model(eval_config(tiny_corpus, cpus=0.5), tiny_model, tiny_corpus["shards"],
                             tiny_corpus["text_tokenizer"], RayConfig())
    assert set(metrics["retrieval"]) >= {"pretrained", "random_init"}
    assert set(metrics["probe"]) >= {"pretrained", "random_init"}
    # The same seeds give the same figures in the task as in this process.
    local = run_evaluation(eval_config(tiny_corpus, cpus=0.5), tiny_model, tiny_corpus["shards"],
                           tiny_corpus["text_tokenizer"])
    assert metrics["probe"] == local["probe"] and metrics["mlm_acc"] == local["mlm_acc"]


def test_recall_in_blocks_matches_the_whole_matrix():
    from pipelines.evaluate.retrieval import _recall

    gen = torch.Generator().manual_seed(0)
    sims = torch.randn(37, 53, generator=gen)
    owner = torch.randint(0, 37, (53,), generator=gen)
    blocked = _recall(lambda rows: sims[rows], lambda cols: sims[:, cols].t(), 37, owner, block=5)
    assert blocked == recall_at(sims, owner)


def test_evaluation_reads_images_a_batch_at_a_time(tiny_corpus, tiny_model, monkeypatch):
    """Fine-tune, recall and probe decode only the files of the batch at hand, each once per use."""
    from model.text_tokenizer import TextTokenizer
    from pipelines.common import eval_data
    from pipelines.common.task_files import random_init_backbone
    from pipelines.evaluate import _probe_data, _retrieval_data
    from pipelines.evaluate.probe import image_features
    from pipelines.evaluate.retrieval import evaluate_retrieval

    cfg = eval_config(tiny_corpus)
    tokenizer = TextTokenizer(tiny_corpus["text_tokenizer"])
    data = _retrieval_data(cfg.retrieval, tokenizer, 32, os.path.abspath)
    probe = _probe_data(cfg.probe, 32, os.path.abspath)
    stacked = eval_data.load_images(probe["train"][0].paths, 32)  # the old all-at-once reference
    loads, load_images = [], eval_data.load_images
    monkeypatch.setattr(eval_data, "load_images", lambda paths, size: loads.append(len(paths)) or load_images(paths, size))
    backbone = random_init_backbone(tiny_model, 0)
    evaluate_retrieval(lambda: backbone, data["train"], data["test"], cfg.retrieval, tokenizer.pad_id, 0,
                       torch.device("cpu"))
    assert loads == [8] * cfg.retrieval.steps + [24]  # one batch per step, then the 24 test images
    loads.clear()
    feats = image_features(backbone, probe["train"][0], "mean", torch.device("cpu"), chunk=10)
    assert loads == [10, 10, 10, 6] and feats.shape == (36, backbone.config.dim)
    with torch.no_grad():
        expected = backbone.encode(image=stacked)[:, 1:].mean(1)
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-5)


def test_retrieval_lr_grid_scores_only_the_run_with_the_lowest_training_loss(tiny_corpus, tiny_model, monkeypatch):
    """evaluate.retrieval.lr_grid: one fine-tune per lr from the same fresh backbone; the test
    images are read once, for the run whose training loss ended lowest (test never chooses)."""
    import dataclasses

    from model.text_tokenizer import TextTokenizer
    from pipelines.common import eval_data
    from pipelines.common.task_files import random_init_backbone
    from pipelines.evaluate import _retrieval_data
    from pipelines.evaluate.retrieval import evaluate_retrieval

    cfg = eval_config(tiny_corpus)
    retrieval = dataclasses.replace(cfg.retrieval, lr_grid=(1e-5, 3e-3))
    tokenizer = TextTokenizer(tiny_corpus["text_tokenizer"])
    data = _retrieval_data(retrieval, tokenizer, 32, os.path.abspath)
    loads, load_images = [], eval_data.load_images
    monkeypatch.setattr(eval_data, "load_images", lambda paths, size: loads.append(len(paths)) or load_images(paths, size))
    made = []

    def make():
        made.append(random_init_backbone(tiny_model, 0))
        return made[-1]

    result = evaluate_retrieval(make, data["train"], data["test"], retrieval, tokenizer.pad_id, 0, torch.device("cpu"))
    assert len(made) == 2 and made[0] is not made[1]
    assert loads == [8] * retrieval.steps * 2 + [24]
    grid = result["lr_grid_train_loss"]
    assert set(grid) == {"1e-05", "0.003"} and result["lr"] == (1e-5 if grid["1e-05"] < grid["0.003"] else 3e-3)
    assert result["final_train_loss"] == min(grid.values())
    single = evaluate_retrieval(lambda: random_init_backbone(tiny_model, 0), data["train"], data["test"],
                                dataclasses.replace(retrieval, lr_grid=(), lr=3e-3, head_lr=3e-3), tokenizer.pad_id, 0,
                                torch.device("cpu"))
    assert single["final_train_loss"] == grid["0.003"] and "lr_grid_train_loss" not in single
