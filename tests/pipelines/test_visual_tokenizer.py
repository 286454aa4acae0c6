"""visual_tokenizer stage: train (or load) a VQ-KD tokenizer from the cleaned images, in Ray."""
from __future__ import annotations

import hashlib
import io
import json
import random
from typing import get_args, get_type_hints

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.vqkd import VQKD
from model.vqkd.teachers import NORM_STATS
from pipelines.common.configs import ParamsError, build
from pipelines.common.ray_session import RayConfig
from pipelines.demo_data import render_scene
from pipelines.visual_tokenizer import (
    HISTORY_FILE,
    TeacherNorm,
    VisualTokenizerConfig,
    _model_and_teacher,
    read_images,
    train_visual_tokenizer,
)
from tests.model.test_vqkd import images, save_official, small_model
from tests.model.test_vqkd_train import OPENAI_MEAN, random_clip

RAY = RayConfig(num_cpus=4, cpus_per_task=0.5)


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_clean_images(root, n_images: int, n_pairs: int, seed: int = 0) -> str:
    """clean-stage layout: image/ and pair/ Parquet parts with id + image bytes."""
    rng = random.Random(seed)
    for kind, n in (("image", n_images), ("pair", n_pairs)):
        if n == 0:
            continue
        rows = []
        for _ in range(n):
            image, _, caption = render_scene(rng, 96)
            data = png(image)
            row = {"id": hashlib.sha256(data).hexdigest(), "image": data, "width": 96, "height": 96,
                   "source": f"demo_{kind}"}
            rows.append({**row, "caption": caption} if kind == "pair" else row)
        (root / kind).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / kind / "part-00000.parquet")
    return str(root)


def write_probe_folder(root, per_split: dict[str, int], seed: int = 1) -> str:
    rng = random.Random(seed)
    for split, n in per_split.items():
        for i in range(n):
            image, labels, _ = render_scene(rng, 96, num_objects=1)
            path = root / split / labels["shape"] / f"{split}-{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png(image))
    return str(root)


def test_trains_saves_and_reports(tmp_path, ray_local):
    clean = write_clean_images(tmp_path / "clean", n_images=40, n_pairs=40)
    probe = write_probe_folder(tmp_path / "probe", {"train": 24, "val": 12})
    cfg = VisualTokenizerConfig(out_dir=str(tmp_path / "vt"), steps=30, warmup_steps=10, batch_size=16,
                                holdout=20, probe_dir=probe, num_threads=1, n_codes=64)
    metrics = train_visual_tokenizer(cfg, clean, RAY)

    model = VQKD.load(cfg.out_dir)
    assert model.config.image_size == 96 and model.config.num_patches == 36
    assert model.config.out_dim == 120  # sized to the colour HOG teacher: 3 x 2 x 2 x (9 bins + 1 colour)
    assert model.config.n_codes == 64 == metrics["n_codes"]
    assert bool(model.quantize.embedding.initted)
    history = json.loads((tmp_path / "vt" / HISTORY_FILE).read_text())
    assert [h["step"] for h in history] == list(range(30))
    assert {"loss", "rec_loss", "commit_loss", "utilisation", "perplexity"} <= set(history[-1])
    assert metrics["trained"] and metrics["num_images"] == 80 and metrics["num_holdout_images"] == 20
    assert metrics["num_train_images"] == 60 and metrics["undecodable_images"] == 0
    assert 0 < metrics["holdout_utilisation"] <= 1 and metrics["holdout_perplexity"] >= 1
    assert metrics["probe_classes"] == ["circle", "square", "triangle"]
    assert 0 <= metrics["probe_accuracy"] <= 1 and metrics["probe_images"] == [24, 12]
    assert metrics["train_cpu_seconds"] > 0 and metrics["teacher_cached"]

    again = train_visual_tokenizer(cfg, clean, RAY)  # same data, params, seed: same tokenizer
    assert again["holdout_utilisation"] == metrics["holdout_utilisation"]
    x = images(3, size=96)
    assert torch.equal(VQKD.load(cfg.out_dir).codes(x), model.codes(x))


def write_caption_tokenizer(root, clean: str) -> str:
    """A sentencepiece model trained by the text_tokenizer stage's code on the pairs' captions."""
    from model.text_tokenizer import TextTokenizer
    from pipelines.text_tokenizer import TextTokenizerConfig, train_model, write_tokenizer

    model_bytes, _ = train_model(TextTokenizerConfig(out_dir=str(root), vocab_size=48),
                                 [(f"{clean}/pair/part-00000.parquet", "caption")])
    write_tokenizer(str(root), model_bytes, TextTokenizer.from_bytes(model_bytes))
    return str(root)


def test_corpus_clip_teacher_trains_on_the_pairs_and_is_versioned(tmp_path, ray_local):
    # a clean folder under a folder named "pair": only clean's own pair/ parts hold captions
    clean = write_clean_images(tmp_path / "pair" / "clean", n_images=8, n_pairs=40)
    tokenizer = write_caption_tokenizer(tmp_path / "tok", clean)
    cfg = build(VisualTokenizerConfig, {
        "out_dir": str(tmp_path / "vt"), "teacher": "corpus_clip", "steps": 12, "warmup_steps": 4,
        "batch_size": 16, "holdout": 8, "probe_dir": None, "n_codes": 16,
        "corpus_clip": {"steps": 6, "warmup_steps": 2, "batch_size": 16, "width": 32}}, "visual_tokenizer")
    metrics = train_visual_tokenizer(cfg, clean, RAY, tokenizer)
    assert metrics["teacher"] == "corpus_clip" and metrics["corpus_clip_pairs"] == 40
    assert metrics["corpus_clip_final_loss"] > 0
    assert VQKD.load(cfg.out_dir).config.out_dim == 32  # the teacher's width
    teacher = json.loads((tmp_path / "vt" / "teacher.json").read_text())
    assert teacher["kind"] == "corpus_clip" and teacher["mean"] == list(OPENAI_MEAN)
    weights = (tmp_path / "vt" / "teacher.safetensors").read_bytes()
    train_visual_tokenizer(cfg, clean, RAY, tokenizer)  # same data, params, seed: the same teacher
    assert (tmp_path / "vt" / "teacher.safetensors").read_bytes() == weights
    with pytest.raises(ValueError, match="corpus_clip needs the text tokenizer"):
        train_visual_tokenizer(cfg, clean, RAY)


def test_pretrained_checkpoint_skips_training(tmp_path, ray_local):
    clean = write_clean_images(tmp_path / "clean", n_images=6, n_pairs=0)
    official = small_model(decoder_depth=3)  # 64 px official layout
    save_official(official, tmp_path / "vqkd.pth")
    cfg = VisualTokenizerConfig(out_dir=str(tmp_path / "vt"), pretrained=str(tmp_path / "vqkd.pth"),
                                image_size=64, holdout=4, probe_dir=None)
    metrics = train_visual_tokenizer(cfg, clean, RAY)
    assert not metrics["trained"] and metrics["num_holdout_images"] == 4
    assert metrics["probe_accuracy"] is None and "probe_note" in metrics
    x = images(2)
    assert torch.equal(VQKD.load(cfg.out_dir).codes(x), official.codes(x))

    wrong = VisualTokenizerConfig(out_dir=str(tmp_path / "vt2"), pretrained=cfg.pretrained, image_size=96)
    with pytest.raises(ValueError, match="set image_size: 64"):
        train_visual_tokenizer(wrong, clean, RAY)


def test_read_images_dedups_and_counts_undecodable(tmp_path):
    write_clean_images(tmp_path / "clean", n_images=5, n_pairs=3)
    table = pq.read_table(tmp_path / "clean" / "image" / "part-00000.parquet")
    broken = pa.Table.from_pylist([{"id": "bad", "image": b"not an image", "width": 1, "height": 1,
                                    "source": "x"}])
    pq.write_table(pa.concat_tables([table, broken]), tmp_path / "clean" / "image" / "part-00001.parquet")
    parts = sorted(str(p) for p in (tmp_path / "clean").rglob("*.parquet"))
    x, bad = read_images(parts, 96, seed=0, limit=100)
    assert x.shape == (8, 3, 96, 96) and x.dtype == torch.uint8 and bad == 1  # duplicates read once
    first, _ = read_images(parts, 96, seed=0, limit=100)
    assert torch.equal(x, first)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ParamsError, match="visual_tokenizer.teacher_checkpoint"):
        build(VisualTokenizerConfig, {"out_dir": "unused", "teacher": "vit"}, "visual_tokenizer")
    with pytest.raises(ParamsError, match="visual_tokenizer.stepz: unknown key"):
        build(VisualTokenizerConfig, {"out_dir": "unused", "stepz": 3}, "visual_tokenizer")
    with pytest.raises(ParamsError, match="warmup_steps"):
        build(VisualTokenizerConfig, {"out_dir": "unused", "steps": 10, "warmup_steps": 10}, "visual_tokenizer")
    with pytest.raises(FileNotFoundError, match="no image"):
        train_visual_tokenizer(VisualTokenizerConfig(out_dir=str(tmp_path / "o")), str(tmp_path), RAY)


def test_teacher_norm_params(tmp_path):
    def cfg(**params):
        return build(VisualTokenizerConfig, {"out_dir": "unused", **params}, "visual_tokenizer")

    names = get_args(get_args(get_type_hints(VisualTokenizerConfig)["teacher_norm"])[0])
    assert set(names) == set(NORM_STATS)  # every named statistic is expressible in params
    assert cfg().teacher_norm is None and cfg().teacher_norm_stats() is None
    vit = {"teacher": "vit", "teacher_checkpoint": "t.pth"}
    assert cfg(**vit, teacher_norm="openai_clip").teacher_norm_stats()[0] == OPENAI_MEAN
    explicit = cfg(**vit, teacher_norm={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    assert explicit.teacher_norm == TeacherNorm((0.5,) * 3, (0.25,) * 3)
    assert explicit.teacher_norm_stats() == ((0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ParamsError, match="visual_tokenizer.teacher_norm: normalisation needs"):
        cfg(**vit, teacher_norm={"mean": [0.5, 0.5, 0.5], "std": [0.0, 0.25, 0.25]})
    with pytest.raises(ParamsError, match="visual_tokenizer.teacher_norm"):
        cfg(**vit, teacher_norm="openai")
    for pixels_only in ("hog_colour", "hog"):
        with pytest.raises(ParamsError, match=f"visual_tokenizer.teacher_norm: must be null for teacher '{pixels_only}'"):
            cfg(teacher=pixels_only, teacher_norm="imagenet")
    with pytest.raises(ParamsError, match="visual_tokenizer.n_codes: must be >= 2"):
        cfg(n_codes=1)
    with pytest.raises(ParamsError, match="visual_tokenizer.teacher_checkpoint: required when teacher is 'clip'"):
        cfg(teacher="clip")
    assert cfg(teacher="corpus_clip").corpus_clip.steps > 0  # trained from the pairs: no checkpoint
    with pytest.raises(ParamsError, match="visual_tokenizer.corpus_clip.*max_caption_tokens"):
        cfg(teacher="corpus_clip", corpus_clip={"max_caption_tokens": 2})


def test_clip_teacher_sizes_the_tokenizer(tmp_path):
    torch.save(random_clip().state_dict(), tmp_path / "clip.pt")  # 32 px, patch 8, 24-d targets
    cfg = build(VisualTokenizerConfig, {"out_dir": "unused", "image_size": 32, "teacher": "clip",
                                        "teacher_checkpoint": str(tmp_path / "clip.pt")}, "visual_tokenizer")
    model, teacher, files, _ = _model_and_teacher(cfg, [], None, torch.device("cpu"))
    assert files == {}  # a loaded teacher is the user's file, not an output
    assert model.config.out_dim == teacher.dim == 24
    assert torch.allclose(teacher.mean.flatten(), torch.tensor(OPENAI_MEAN))  # clip's own statistics
    feats, _ = teacher(torch.rand(2, 3, 32, 32))
    assert feats.shape == (2, model.config.num_patches, 24)
