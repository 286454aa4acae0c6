"""evaluate stage: masked-prediction accuracy, retrieval and linear probe vs random init.

Everything runs in one Ray task (one GPU with evaluate.use_gpu):
1. masked prediction on the held-out shards: top-1 accuracy of text MLM, caption MLM
   and image MIM, with masks drawn from a fixed seed so every run scores the same positions;
2. retrieval: a short contrastive fine-tune of the whole model with vision_head /
   language_head / logit_scale on the Karpathy train split, then R@1/5/10 both ways on
   the test split (pipelines.evaluate.retrieval);
3. linear probe on frozen image features of an ImageFolder (pipelines.evaluate.probe);
(2) and (3) twice: for the pretrained backbone and for a randomly initialised one of the
same shape with the same budget, data order and head initialisation. (2) and (3) read
their images from disk a batch at a time (pipelines.common.eval_data.ImageFiles), so memory
is bounded by the batch and the feature matrices whatever the size of the sets;
evaluate.retrieval.max_* only shorten quick runs.

Modules: retrieval.py (retrieval heads, contrastive fine-tune, recall@k), probe.py (frozen
image features for the linear probe); this module runs masked prediction and the whole stage.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from pipelines.common.configs import check
from pipelines.common.ray_session import RayConfig, ray_session
from pipelines.common.schema import MODALITIES


@dataclass(frozen=True)
class RetrievalConfig:
    dataset: str = "data/demo/eval/retrieval/dataset.json"  # Karpathy format (COCO, Flickr30k, demo)
    image_root: str | None = None  # null: the dataset.json folder; images at root/filepath/filename
    train_splits: tuple[str, ...] = ("train", "restval")
    test_split: str = "test"
    max_train_images: int | None = None
    max_test_images: int | None = None
    steps: int = 150
    batch_size: int = 64
    lr: float = 2e-4        # backbone
    head_lr: float = 2e-4   # vision_head, language_head, logit_scale (freshly initialised)
    lr_grid: tuple[float, ...] = ()  # backbone lrs to try (head_lr scaled alike); the lowest training loss is scored
    weight_decay: float = 0.05
    warmup_steps: int = 15
    drop_path: float = 0.0
    max_text_len: int = 64
    pool: Literal["cls", "mean"] = "cls"  # cls: as BEiT3ForRetrieval; mean: of patch / text states

    def __post_init__(self):
        check(self.steps >= 1 and self.batch_size >= 2, "evaluate.retrieval: steps >= 1 and batch_size >= 2")
        check(self.lr > 0 and self.head_lr > 0, "evaluate.retrieval: lr and head_lr must be > 0")
        check(all(lr > 0 for lr in self.lr_grid), "evaluate.retrieval.lr_grid: every lr must be > 0")
        check(0 <= self.drop_path < 1, "evaluate.retrieval.drop_path: must be in [0, 1)")
        check(self.max_text_len >= 3, "evaluate.retrieval.max_text_len: must be >= 3")


@dataclass(frozen=True)
class ProbeConfig:
    root: str = "data/demo/eval/classification"  # ImageFolder: root/<split>/<class>/<image>
    train_split: str = "train"
    val_split: str = "val"
    pool: Literal["mean", "cls"] = "cls"
    steps: int = 300   # full-batch AdamW steps of the logistic regression
    lr: float = 0.01
    weight_decay: float = 1e-4

    def __post_init__(self):
        check(self.steps >= 1 and self.lr > 0, "evaluate.probe: steps >= 1 and lr > 0")


@dataclass(frozen=True)
class EvaluateConfig:
    split: str = "val"           # held-out shards for masked prediction
    batch_size: int = 32         # per modality, masked prediction
    max_samples: int = 2000      # per modality, masked prediction
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    seed: int = 0
    use_gpu: bool = False
    cpus: float = 1.0            # CPUs of the evaluation task
    threads: int | None = None   # torch threads; null = all cores

    def __post_init__(self):
        check(self.batch_size >= 1 and self.max_samples >= 1, "evaluate: batch_size and max_samples must be >= 1")
        check(self.cpus > 0, "evaluate.cpus: must be > 0")


def evaluate_model(cfg: EvaluateConfig, model_dir: str, shards_dir: str, text_tokenizer_dir: str,
                   ray_cfg: RayConfig) -> dict:
    """Run the whole evaluation in one Ray task; returns metrics/evaluate.json."""
    from pipelines.common.shards import absolute

    args = (cfg, absolute(model_dir), absolute(shards_dir), absolute(text_tokenizer_dir))
    with ray_session(ray_cfg) as ray:
        task = ray.remote(num_cpus=cfg.cpus, num_gpus=1 if cfg.use_gpu else 0)(run_evaluation)
        return ray.get(task.remote(*args))


def run_evaluation(cfg: EvaluateConfig, model_dir: str, shards_dir: str, text_tokenizer_dir: str) -> dict:
    """The evaluation itself (in the Ray task; callable directly too)."""
    from model.text_tokenizer import TextTokenizer
    from pipelines.common.task_files import load_exported_task

    started = time.time()
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    tokenizer = TextTokenizer(text_tokenizer_dir)
    task = load_exported_task(model_dir)
    if task.heads.text.proj.out_features != tokenizer.vocab_size:
        raise ValueError(f"{model_dir} was trained with a {task.heads.text.proj.out_features}-word text vocabulary, "
                         f"{text_tokenizer_dir} has {tokenizer.vocab_size}")
    metrics = masked_prediction(task.to(device), cfg, shards_dir, tokenizer.pad_id, device)
    print(f"evaluate: masked prediction {metrics['masked_prediction']} ({time.time() - started:.0f} s)", flush=True)
    metrics.update(retrieval_and_probe(cfg, model_dir, tokenizer, device, started))
    metrics["seconds"] = round(time.time() - started, 1)
    return metrics


def retrieval_and_probe(cfg: EvaluateConfig, model_dir: str, tokenizer, device, started: float | None = None) -> dict:
    """Retrieval and linear probe of the pretrained and the random-init backbone ->
    {"retrieval", "probe", "pretraining_gain"}. Images are read from disk batch by batch."""
    from pipelines.common.shards import absolute
    from pipelines.common.task_files import (
        load_exported_task,
        random_init_backbone,
        read_task_spec,
    )

    started = time.time() if started is None else started
    image_size = read_task_spec(model_dir)["backbone"]["image_size"]
    retrieval_data = _retrieval_data(cfg.retrieval, tokenizer, image_size, absolute)
    probe_data = _probe_data(cfg.probe, image_size, absolute)
    backbones = {
        "pretrained": lambda: load_exported_task(model_dir, drop_path=cfg.retrieval.drop_path).model,
        "random_init": lambda: random_init_backbone(model_dir, cfg.seed, drop_path=cfg.retrieval.drop_path),
    }
    metrics = {"retrieval": {}, "probe": {}}
    for name, make in backbones.items():
        metrics["probe"][name] = _probe(make().to(device), probe_data, cfg, device)
        print(f"evaluate: {name} probe top-1 {metrics['probe'][name]['top1']} ({time.time() - started:.0f} s)", flush=True)
        metrics["retrieval"][name] = _retrieval(make, retrieval_data, cfg, tokenizer.pad_id, device)
        print(f"evaluate: {name} retrieval mean R@1 {metrics['retrieval'][name]['mean_r1']} "
              f"({time.time() - started:.0f} s)", flush=True)
    metrics["retrieval"]["data"] = {k: len(v.images) for k, v in retrieval_data.items()}
    metrics["probe"]["data"] = {"classes": probe_data["classes"], "train": len(probe_data["train"][1]),
                                "val": len(probe_data["val"][1])}
    r, p = metrics["retrieval"], metrics["probe"]
    metrics["pretraining_gain"] = {
        "retrieval_mean_r1": round(r["pretrained"]["mean_r1"] - r["random_init"]["mean_r1"], 4),
        "probe_top1": round(p["pretrained"]["top1"] - p["random_init"]["top1"], 4),
    }
    return metrics


@torch.no_grad()
def masked_prediction(task, cfg: EvaluateConfig, shards_dir: str, pad_id: int, device) -> dict:
    """Top-1 accuracy / loss of each masked-prediction part over the held-out shards."""
    from model.batch import collate_rows
    from pipelines.common.shards import ShardRowReader, split_index

    index = split_index(shards_dir, cfg.split)
    task.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    sums: dict[str, list[float]] = {}
    for modality in MODALITIES:
        reader, rows = ShardRowReader(index, modality, cache_size=1), []
        for shard in range(len(index.paths)):
            rows += reader.rows_of(shard)[: cfg.max_samples - len(rows)]
        for start in range(0, len(rows), cfg.batch_size):
            out = task(collate_rows(rows[start:start + cfg.batch_size], pad_id).to(device), generator=gen)
            for key, count in out.counts.items():
                n = float(count)
                if n:
                    s = sums.setdefault(key, [0.0, 0.0, 0.0])
                    s[0] += float(out.accuracies[key]) * n
                    s[1] += float(out.losses[key]) * n
                    s[2] += n
    parts = {k: {"acc": round(a / n, 4), "loss": round(l / n, 4), "count": int(n)} for k, (a, l, n) in sums.items()}
    acc = {k: v["acc"] for k, v in parts.items()}
    return {"mlm_acc": acc.get("text_mlm"), "caption_mlm_acc": acc.get("pair_mlm"),
            "mim_acc": acc.get("image_mim"), "pair_mim_acc": acc.get("pair_mim"),
            "masked_prediction": parts}


def _retrieval_data(cfg: RetrievalConfig, tokenizer, image_size: int, absolute) -> dict:
    """{"train", "test"}: RetrievalData with the image files (not their pixels) and tokenized captions."""
    from pipelines.common.eval_data import ImageFiles, read_karpathy
    from pipelines.evaluate.retrieval import RetrievalData

    root = absolute(cfg.image_root) if cfg.image_root else None
    out = {}
    for name, splits, limit in (("train", cfg.train_splits, cfg.max_train_images),
                                ("test", (cfg.test_split,), cfg.max_test_images)):
        split = read_karpathy(absolute(cfg.dataset), root, tuple(splits))
        keep = len(split.image_paths) if limit is None else min(limit, len(split.image_paths))
        captions = [(c, i) for c, i in zip(split.captions, split.caption_image) if i < keep]
        out[name] = RetrievalData(ImageFiles(tuple(split.image_paths[:keep]), image_size),
                                  [tokenizer.encode(c, cfg.max_text_len) for c, _ in captions],
                                  torch.tensor([i for _, i in captions], dtype=torch.long))
    return out


def _probe_data(cfg: ProbeConfig, image_size: int, absolute) -> dict:
    """classes, and per split (ImageFiles, (N,) labels)."""
    from pipelines.common.eval_data import ImageFiles, read_image_folder

    root = absolute(cfg.root)
    train_paths, train_y, classes = read_image_folder(root, cfg.train_split)
    val_paths, val_y, _ = read_image_folder(root, cfg.val_split, classes)
    return {"classes": classes,
            "train": (ImageFiles(tuple(train_paths), image_size), torch.tensor(train_y)),
            "val": (ImageFiles(tuple(val_paths), image_size), torch.tensor(val_y))}


def _probe(backbone, data: dict, cfg: EvaluateConfig, device) -> dict:
    from pipelines.common.linear_probe import linear_probe
    from pipelines.evaluate.probe import image_features

    (train_x, train_y), (val_x, val_y) = data["train"], data["val"]
    feats = [image_features(backbone, x, cfg.probe.pool, device) for x in (train_x, val_x)]
    return linear_probe(feats[0], train_y, feats[1], val_y, len(data["classes"]),
                        steps=cfg.probe.steps, lr=cfg.probe.lr, weight_decay=cfg.probe.weight_decay, seed=cfg.seed)


def _retrieval(make_backbone, data: dict, cfg: EvaluateConfig, pad_id: int, device) -> dict:
    from pipelines.evaluate.retrieval import evaluate_retrieval

    return evaluate_retrieval(lambda: make_backbone().to(device), data["train"], data["test"], cfg.retrieval,
                              pad_id, cfg.seed, device)
