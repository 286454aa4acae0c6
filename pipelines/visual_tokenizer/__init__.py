"""visual_tokenizer stage: train the VQ-KD tokenizer (or load an official one).

Inputs: every cleaned image (``clean_dir/image/*.parquet`` and
``clean_dir/pair/*.parquet``, columns ``id`` and ``image`` bytes), unique by id,
shuffled with ``seed``; the first ``holdout`` images are held out of training
and measure the codebook (utilisation = fraction of codes used, perplexity).
If ``probe_dir`` holds an ImageFolder (``train``/``val`` splits, e.g. the demo's
colour classes), a linear probe on per-image code histograms shows whether the
codes carry image content.

Teacher ``corpus_clip`` first trains a small CLIP on the cleaned image-caption pairs
(captions encoded by the text_tokenizer stage's model) and distils its patch features
(corpus_teacher.py): BEiT v2's recipe where no released CLIP can be loaded.

With ``pretrained`` set (a released BEiT v2 ``vqkd_*.pth``, local or URI) no
training happens: the checkpoint is converted and evaluated the same way.
Training and evaluation run in one Ray task (``num_gpus`` > 0 puts it on a GPU).

Outputs in ``out_dir``: ``model.safetensors`` + ``config.json`` (``VQKD.load``)
and ``history.json`` (per training step: loss, batch utilisation, perplexity).
"""
from __future__ import annotations

import dataclasses
import io
import random
import time
from dataclasses import dataclass, field
from typing import Iterator, Literal

import pyarrow as pa
import pyarrow.compute as pc
import torch

from model.vqkd.corpus_clip import CorpusClipTrainConfig
from pipelines.common import storage
from pipelines.common.configs import ParamsError, check
from pipelines.common.ray_session import RayConfig, ray_session

HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class TeacherNorm:
    """Explicit per-channel (R, G, B) statistics the teacher's input is normalised with."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class VisualTokenizerConfig:
    out_dir: str = field(kw_only=True)
    preset: Literal["tiny", "official-base"] = "tiny"
    pretrained: str | None = None          # official BEiT v2 vqkd .pth: load it, skip training
    image_size: int = 96                   # tokenizer input size (official: 224)
    n_codes: int | None = None             # codebook size when training; null: the preset's (a
                                           # pretrained checkpoint brings its own; metrics record it)
    teacher: Literal["hog_colour", "hog", "vit", "clip", "corpus_clip"] = "hog_colour"
    teacher_checkpoint: str | None = None  # vit / clip -> local file (model/vqkd/teachers.py formats)
    corpus_clip: CorpusClipTrainConfig = CorpusClipTrainConfig()  # teacher corpus_clip's training
    teacher_input_size: int | None = None  # a TorchScript teacher's image size
    # vit / clip / corpus_clip input statistics: a name (model/vqkd/teachers.py NORM_STATS) or
    # {mean, std}; null: the teacher's own (vit: imagenet, clip and corpus_clip: openai_clip)
    teacher_norm: Literal["imagenet", "openai_clip"] | TeacherNorm | None = None
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100                # steps without the quantizer before k-means
    dead_code_steps: int = 20              # restart codes unused for this many steps
    seed: int = 0
    holdout: int = 300                     # images kept out of training for the codebook metrics
    max_images: int = 50000                # training images held in memory (uint8)
    probe_dir: str | None = "data/demo/eval/classification"  # ImageFolder; null: no probe
    num_threads: int = 1                   # torch threads in the training task (more help only on
                                           # idle cores and stall badly when they are shared)
    teacher_cache_mb: int = 1024           # precompute teacher targets once if they fit (0: never)
    num_gpus: float = 0.0

    def __post_init__(self):
        check(self.image_size >= 16, "visual_tokenizer.image_size: must be >= 16")
        check(self.steps >= 1 and self.batch_size >= 1, "visual_tokenizer.steps/batch_size: must be >= 1")
        check(0 <= self.warmup_steps < self.steps, "visual_tokenizer.warmup_steps: must be in [0, steps)")
        check(self.lr > 0, "visual_tokenizer.lr: must be > 0")
        check(self.dead_code_steps >= 1, "visual_tokenizer.dead_code_steps: must be >= 1")
        check(self.holdout >= 1, "visual_tokenizer.holdout: must be >= 1")
        check(self.max_images >= 1, "visual_tokenizer.max_images: must be >= 1")
        check(self.num_threads >= 1 and self.num_gpus >= 0, "visual_tokenizer.num_threads/num_gpus")
        check(self.teacher_cache_mb >= 0, "visual_tokenizer.teacher_cache_mb: must be >= 0")
        pixels_only = self.teacher in ("hog_colour", "hog")
        check(pixels_only or self.teacher == "corpus_clip" or bool(self.teacher_checkpoint),
              f"visual_tokenizer.teacher_checkpoint: required when teacher is {self.teacher!r}")
        check(not pixels_only or self.teacher_norm is None,
              f"visual_tokenizer.teacher_norm: must be null for teacher {self.teacher!r} (it reads raw pixels)")
        check(self.n_codes is None or self.n_codes >= 2, "visual_tokenizer.n_codes: must be >= 2 or null")
        try:
            self.teacher_norm_stats()
        except ValueError as err:
            raise ParamsError(f"visual_tokenizer.teacher_norm: {err}") from err

    def teacher_norm_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(mean, std) for the teacher, or None for its own statistics."""
        norm = self.teacher_norm
        if norm is None:
            return None
        from model.vqkd.teachers import norm_stats

        return norm_stats(norm if isinstance(norm, str) else (norm.mean, norm.std))


def train_visual_tokenizer(cfg: VisualTokenizerConfig, clean_dir: str, ray_cfg: RayConfig,
                           text_tokenizer_dir: str | None = None) -> dict:
    """Train (or load) the tokenizer into ``cfg.out_dir``; returns the stage metrics.
    ``text_tokenizer_dir`` encodes the captions for teacher ``corpus_clip``."""
    start = time.time()
    parts = image_parts(clean_dir)
    if not parts:
        raise FileNotFoundError(f"{clean_dir}: no image/*.parquet or pair/*.parquet with images")
    with ray_session(ray_cfg) as ray:
        task = ray.remote(num_cpus=min(ray_cfg.cpus_per_task * cfg.num_threads, 64),
                          num_gpus=cfg.num_gpus)(build_tokenizer)
        files, history, metrics = ray.get(task.remote(cfg, parts, text_tokenizer_dir))
    staging = storage.staging_dir(cfg.out_dir)  # swapped in whole: no new weights beside an old config
    for name, data in files.items():  # weights first, config.json last (readers key on it)
        storage.write_bytes(storage.join(staging, name), data)
    storage.write_json(storage.join(staging, HISTORY_FILE), history)
    storage.publish_dir(staging, cfg.out_dir)
    return {**metrics, "seconds": round(time.time() - start, 2)}


def image_parts(clean_dir: str) -> list[str]:
    return [p for kind in ("image", "pair")
            for p in storage.list_files(storage.join(clean_dir, kind), ".parquet")]


def build_tokenizer(cfg: VisualTokenizerConfig, parts: list[str],
                    text_tokenizer_dir: str | None = None) -> tuple[dict, list, dict]:
    """Ray task: read images, train or load, evaluate -> (files, history, metrics)."""
    from model.vqkd.train import VQKDTrainConfig, precompute_targets, train_vqkd

    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)  # the model's initial weights: same params, same tokenizer
    device = torch.device("cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")
    model, teacher, teacher_files, teacher_metrics = _model_and_teacher(cfg, parts, text_tokenizer_dir, device)
    size = model.config.image_size
    if cfg.pretrained and size != cfg.image_size:
        raise ValueError(f"visual_tokenizer.image_size is {cfg.image_size} but {cfg.pretrained} "
                         f"takes {size} px images; set image_size: {size}")
    images, undecodable = read_images(parts, size, cfg.seed, cfg.holdout + cfg.max_images)
    n_hold = min(cfg.holdout, len(images) // 2) if not cfg.pretrained else min(cfg.holdout, len(images))
    holdout, train = images[:n_hold], images[n_hold:]
    model.to(device)
    history, metrics = [], {"trained": not cfg.pretrained, "preset": cfg.preset,
                            "image_size": size, "n_codes": model.config.n_codes,
                            "num_images": len(images), "undecodable_images": undecodable,
                            "num_holdout_images": len(holdout), "device": str(device), **teacher_metrics}
    if not cfg.pretrained:
        if len(train) == 0:
            raise ValueError("visual_tokenizer: need at least 2 decodable images to train")
        train_cfg = VQKDTrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                    dead_code_steps=cfg.dead_code_steps, seed=cfg.seed)
        cpu0, t0 = time.process_time(), time.perf_counter()
        c = model.config
        cached = len(train) * c.num_patches * c.out_dim * 2 <= cfg.teacher_cache_mb * 2**20
        targets = precompute_targets(teacher.to(device), train.to(device)) if cached else None
        history = train_vqkd(model, teacher, shuffled_batches(train, cfg.batch_size, cfg.seed, targets),
                             train_cfg, on_step=progress(cfg.steps))
        metrics.update(
            num_train_images=len(train), steps=cfg.steps, teacher=cfg.teacher, teacher_cached=cached,
            train_seconds=round(time.perf_counter() - t0, 2),
            train_cpu_seconds=round(time.process_time() - cpu0, 2),
            final_rec_loss=tail_mean(history, "rec_loss"))
    metrics.update(evaluate_codes(model, holdout, cfg))
    return {**teacher_files, **model.serialize()}, [_rounded(h) for h in history], metrics


def progress(steps: int, label: str = "visual_tokenizer", every: int = 50):
    """on_step callback printing every ``every`` steps: loss, batch code use, seconds when logged."""
    def report(log: dict) -> None:
        if log["step"] % every == 0 or log["step"] == steps - 1:
            used = f", batch codes used {log['utilisation']:.2f}" if "utilisation" in log else ""
            took = f", {log['seconds']:.0f} s" if "seconds" in log else ""
            print(f"{label} step {log['step'] + 1}/{steps}: loss {log['loss']:.4f}{used}{took}", flush=True)
    return report


def _model_and_teacher(cfg: VisualTokenizerConfig, parts: list[str], text_tokenizer_dir: str | None, device):
    """(model, teacher, teacher's files, teacher's metrics): the official VQKD and no teacher
    with ``pretrained``; else a fresh preset VQKD sized to the teacher, and the teacher."""
    from model.vqkd import VQKD, vqkd_preset
    from model.vqkd.teachers import build_teacher

    if cfg.pretrained:
        source = (io.BytesIO(storage.read_bytes(cfg.pretrained)) if storage.is_uri(cfg.pretrained)
                  else cfg.pretrained)
        return VQKD.from_official(source), None, {}, {}
    sizes = {"n_codes": cfg.n_codes} if cfg.n_codes else {}
    base = vqkd_preset(cfg.preset, image_size=cfg.image_size, **sizes)
    files, metrics = {}, {}
    if cfg.teacher == "corpus_clip":
        from pipelines.visual_tokenizer.corpus_teacher import train_corpus_teacher

        teacher, files, metrics = train_corpus_teacher(cfg, parts, text_tokenizer_dir, base.grid,
                                                       base.patch_size, device)
    else:
        teacher = build_teacher(cfg.teacher, base.grid, base.patch_size, cfg.teacher_checkpoint,
                                cfg.teacher_input_size, cfg.teacher_norm_stats())
    return VQKD(dataclasses.replace(base, out_dim=teacher.dim)), teacher, files, metrics


def read_images(parts: list[str], image_size: int, seed: int, limit: int) -> tuple[torch.Tensor, int]:
    """Unique (by id) images of every part, seeded shuffle, first ``limit`` ->
    (uint8 (M, 3, S, S) preprocessed as the tokenizer sees them, number undecodable)."""
    chosen, rows = chosen_rows(parts, seed, limit, ("image",))
    out, bad = [], len(chosen) - len(rows)  # null image bytes count as undecodable
    for id_ in (i for i in chosen if i in rows):
        x = decode_uint8(rows[id_][0], image_size)
        if x is None:
            bad += 1  # the clean stage verified every image; count rather than hide any
            continue
        out.append(x)
    if not out:
        raise ValueError(f"visual_tokenizer: no decodable images in {len(parts)} parquet part(s)")
    return torch.stack(out), bad


def chosen_rows(parts: list[str], seed: int, limit: int, columns: tuple[str, ...],
                required: tuple[str, ...] = ()) -> tuple[list, dict]:
    """The unique ids of the parts' rows whose ``required`` columns are set, seeded shuffle, first
    ``limit`` -> (those ids in order, {id: tuple of ``columns``} for the chosen ids whose
    ``columns`` are all set, first occurrence). Set: not null, and a string not empty.

    Two passes, so that only the chosen rows' values (image bytes) are ever held: corpora can be large."""
    ids = set()
    for path in parts:
        table = storage.read_parquet(path, ["id", *required])
        ids.update(_where_set(table, required).column("id").to_pylist())
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    chosen = order[:limit]
    rows, wanted = {}, None
    for path in parts:
        table = storage.read_parquet(path, ["id", *columns])
        if wanted is None or wanted.type != table.schema.field("id").type:
            wanted = pa.array(chosen, type=table.schema.field("id").type)
        table = _where_set(table.filter(pc.is_in(table.column("id"), value_set=wanted)), columns)
        for id_, *values in zip(*(table.column(c).to_pylist() for c in ("id", *columns))):
            rows.setdefault(id_, tuple(values))
    return chosen, rows


def _where_set(table: pa.Table, columns: tuple[str, ...]) -> pa.Table:
    """The rows of ``table`` whose ``columns`` are all set (not null; strings not empty)."""
    mask = None
    for name in columns:
        column = table.column(name)
        ok = pc.is_valid(column)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            ok = pc.and_(ok, pc.greater(pc.utf8_length(column), 0))
        mask = ok if mask is None else pc.and_(mask, ok)
    return table if mask is None else table.filter(mask)


def shuffled_batches(images: torch.Tensor, batch_size: int, seed: int, targets=None) -> Iterator:
    """Endless epochs of seeded-shuffled batches of uint8 (M, 3, S, S) images as float
    (B, 3, S, S) in [0, 1]; with ``targets`` = (targets (M, N, D), weights (M, N) | None)
    from precompute_targets, tuples (images, targets, weights) of the same rows."""
    for rows in shuffled_rows(len(images), batch_size, seed):
        rows = rows.to(images.device)
        x = images[rows].float().div(255)
        if targets is None:
            yield x
        else:
            t, w = targets
            yield x, t[rows], (None if w is None else w[rows])


def shuffled_rows(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless epochs of a seeded shuffle of range(n), as row indices of min(batch_size, n);
    an epoch's last partial batch is dropped."""
    g = torch.Generator().manual_seed(seed)
    bs = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - bs + 1, bs):
            yield perm[i:i + bs]


def decode_uint8(data: bytes, image_size: int) -> torch.Tensor | None:
    """Image bytes -> uint8 (3, S, S) as the tokenizer sees them; None if undecodable."""
    from PIL import Image

    from model.images import preprocess

    try:
        with Image.open(io.BytesIO(data)) as img:
            return preprocess(img, image_size).mul(255).round().to(torch.uint8)  # exact: preprocess gives k / 255
    except (OSError, ValueError):
        return None


def tail_mean(history: list[dict], key: str, last: int = 20) -> float:
    """Mean of ``key`` over the last ``last`` logged steps, rounded for the metrics."""
    tail = history[-min(last, len(history)):]
    return round(sum(h[key] for h in tail) / len(tail), 4)


def evaluate_codes(model, holdout: torch.Tensor, cfg: VisualTokenizerConfig) -> dict:
    """Codebook use on held-out images, plus the code-histogram probe when labels exist."""
    from model.vqkd.train import code_usage

    codes = _codes(model, holdout)
    usage = code_usage(codes, model.config.n_codes)
    metrics = {"holdout_utilisation": round(usage["utilisation"], 4),
               "holdout_perplexity": round(usage["perplexity"], 2)}
    if cfg.probe_dir and storage.exists(storage.join(cfg.probe_dir, "train")):
        metrics.update(probe_codes(model, cfg.probe_dir, cfg.seed))
    else:
        metrics.update(probe_accuracy=None, probe_note=f"no ImageFolder at {cfg.probe_dir!r}")
    return metrics


def probe_codes(model, probe_dir: str, seed: int) -> dict:
    """Linear probe on per-image code histograms: train split -> val accuracy."""
    from PIL import Image

    from model.images import preprocess
    from model.vqkd.train import code_histograms
    from pipelines.common.eval_data import read_image_folder
    from pipelines.common.linear_probe import linear_probe

    def features(paths):
        xs = []
        for p in paths:
            with Image.open(io.BytesIO(storage.read_bytes(p))) as img:
                xs.append(preprocess(img, model.config.image_size))
        return code_histograms(_codes(model, torch.stack(xs)).cpu(), model.config.n_codes)

    train_paths, train_y, classes = read_image_folder(probe_dir, "train")
    val_paths, val_y, _ = read_image_folder(probe_dir, "val", classes)
    train_y, val_y = torch.tensor(train_y), torch.tensor(val_y)
    result = linear_probe(features(train_paths), train_y, features(val_paths), val_y, len(classes),
                          steps=300, lr=0.01, weight_decay=1e-4, seed=seed)
    chance = float(torch.bincount(val_y).max()) / len(val_y)  # majority-class rate
    return {"probe_accuracy": result["top1"], "probe_train_accuracy": result["train_top1"],
            "probe_chance": round(chance, 4), "probe_classes": classes,
            "probe_images": [len(train_paths), len(val_paths)]}


def _codes(model, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    device = model.encoder.pos_embed.device
    out = [model.codes(_as_float(images[i:i + chunk]).to(device)) for i in range(0, len(images), chunk)]
    return torch.cat(out)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255) if x.dtype == torch.uint8 else x


def _rounded(log: dict) -> dict:
    """One step's log for history.json, without its wall-clock "seconds": the output must be
    byte-identical across runs (dvc.lock hashes); timing is in the metrics (train_seconds)."""
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in log.items() if k != "seconds"}


__all__ = ["VisualTokenizerConfig", "TeacherNorm", "train_visual_tokenizer", "read_images",
           "shuffled_batches", "evaluate_codes", "probe_codes", "HISTORY_FILE"]
