"""Inputs for the report: real shards and tokenizer, and the metrics files of the stages.

Shards and the sentencepiece tokenizer come from pretrain_fixtures.make_corpus (real
formats). With ``real_training`` the training curves, metrics/pretrain.json and
metrics/evaluate.json come from a real tiny pretraining run and evaluation in this
process; otherwise they are written in the same formats from simple decaying curves.
metrics/clean.json and metrics/visual_tokenizer.json follow the shapes those stages write.
"""
from __future__ import annotations

import math
import os

from pipelines.common import storage
from pipelines.common.train_csv import csv_text
from tests.pipelines.pretrain_fixtures import make_corpus

CLEAN_METRICS = {
    "rows_in": 260, "kept": 240, "rejected": 20,
    "sources": {
        "demo_text": {"kind": "text", "format": "jsonl", "path": "data/demo/text", "rows_in": 160, "kept": 145,
                      "rejected": 15, "rejected_by_reason": {"duplicate": 6, "too_short": 5, "top_ngram": 4}},
        "demo_images": {"kind": "image", "format": "folder", "path": "data/demo/images", "rows_in": 40, "kept": 37,
                        "rejected": 3, "rejected_by_reason": {"duplicate": 2, "too_small": 1}},
        "demo_pairs": {"kind": "pair", "format": "webdataset", "path": "data/demo/pairs", "rows_in": 60, "kept": 58,
                       "rejected": 2, "rejected_by_reason": {"missing_caption": 2}},
    },
    "kinds": {"text": {"rows_in": 160, "kept": 145, "rejected": 15, "steps": [
        {"step": "read", "in": 160, "dropped": 0, "forwarded": 160},
        {"step": "length", "in": 160, "dropped": 5, "forwarded": 155},
        {"step": "repetition", "in": 155, "dropped": 4, "forwarded": 151},
        {"step": "exact_dedup", "in": 151, "dropped": 6, "forwarded": 145}]}},
}
VISUAL_TOKENIZER_METRICS = {"trained": True, "preset": "tiny", "image_size": 32, "n_codes": 8, "teacher": "hog",
                            "num_train_images": 120, "steps": 30, "final_rec_loss": 0.41,
                            "holdout_utilisation": 1.0, "holdout_perplexity": 6.2, "probe_accuracy": None}


def write_report_inputs(root: str, real_training: bool = False) -> dict:
    """Everything the report reads, under ``root`` in the project's default layout."""
    corpus = make_corpus(os.path.join(root, "corpus"), train_rows=24, val_rows=12, shard_rows=24,
                         retrieval={"train": 24, "test": 12}, probe={"train": 18, "val": 9})
    paths = {"shards": corpus["shards"], "text_tokenizer": corpus["text_tokenizer"],
             "metrics": os.path.join(root, "metrics"), "plots": os.path.join(root, "plots", "pretrain.csv")}
    storage.write_json(os.path.join(paths["metrics"], "clean.json"), CLEAN_METRICS)
    storage.write_json(os.path.join(paths["metrics"], "visual_tokenizer.json"), VISUAL_TOKENIZER_METRICS)
    if real_training:
        _train_and_evaluate(root, corpus, paths)
    else:
        _written_training(paths)
    return paths


def _written_training(paths: dict) -> None:
    rows = [{"step": s, "loss": 6 * math.exp(-s / 20) + 1, "loss_text_mlm": 7 * math.exp(-s / 25) + 1,
             "loss_image_mim": 2 * math.exp(-s / 15) + 0.5, "acc_text_mlm": 1 - math.exp(-s / 30),
             "lr": 1e-3 * min(1.0, s / 10), "samples_per_s": 50.0 + s % 3, "elapsed_s": s * 0.5} for s in range(1, 61)]
    storage.write_bytes(paths["plots"], csv_text(rows).encode())
    storage.write_json(os.path.join(paths["metrics"], "pretrain.json"),
                       {"steps": 60, "samples_per_s": 51.0, "train_time_s": 30.0, "num_workers": 1,
                        "final": {"loss": 1.2, "acc_text_mlm": 0.85}})
    storage.write_json(os.path.join(paths["metrics"], "evaluate.json"), {
        "mlm_acc": 0.5, "masked_prediction": {"text_mlm": {"acc": 0.5, "loss": 2.0, "count": 120}},
        "retrieval": {"pretrained": {"i2t_r1": 0.25, "t2i_r1": 0.2, "mean_r1": 0.225},
                      "random_init": {"i2t_r1": 0.1, "t2i_r1": 0.08, "mean_r1": 0.09}, "data": {"train": 24, "test": 12}},
        "probe": {"pretrained": {"top1": 0.45, "train_top1": 0.6}, "random_init": {"top1": 0.39, "train_top1": 0.5}},
        "pretraining_gain": {"retrieval_mean_r1": 0.135, "probe_top1": 0.06}})


def _train_and_evaluate(root: str, corpus: dict, paths: dict) -> None:
    """A real 12-step pretraining run (curves, summary, exported model) and its evaluation."""
    import torch

    from pipelines.common.configs import build
    from pipelines.evaluate import EvaluateConfig, run_evaluation
    from pipelines.pretrain import summary
    from pipelines.pretrain.checkpoints import export_from_checkpoint
    from tests.pipelines.pretrain_fixtures import tiny_job, train_in_process

    torch.set_num_threads(1)
    steps = 12
    job = tiny_job(corpus, os.path.join(root, "train"), steps=steps, checkpoint_every=steps, log_every=1)
    loop, saved = train_in_process(job, keep_dir=os.path.join(root, "train", "kept"))
    storage.write_bytes(paths["plots"], csv_text(loop.history).encode())
    storage.write_json(os.path.join(paths["metrics"], "pretrain.json"),
                       summary(job["cfg"], job["run_name"], {"step": steps}, loop.history, 1.0))
    model_dir = os.path.join(root, "train", "model")
    export_from_checkpoint(saved[steps], model_dir)
    cfg = build(EvaluateConfig, {
        "retrieval": {"dataset": os.path.join(corpus["eval"], "retrieval", "dataset.json"),
                      "steps": 4, "batch_size": 8, "warmup_steps": 1},
        "probe": {"root": os.path.join(corpus["eval"], "classification"), "steps": 20},
        "batch_size": 8, "threads": 1}, "evaluate")
    storage.write_json(os.path.join(paths["metrics"], "evaluate.json"),
                       run_evaluation(cfg, model_dir, corpus["shards"], corpus["text_tokenizer"]))
