"""Teacher ``corpus_clip``: train a small CLIP on the cleaned image-caption pairs, then
distil its patch features (model/vqkd/corpus_clip.py says why).

Runs inside the visual_tokenizer Ray task, before VQ-KD training. Captions are encoded
with the text_tokenizer stage's model; images are preprocessed as the tokenizer sees them.
The teacher's image tower is written beside the tokenizer (``teacher.safetensors``,
``teacher.json``) so the targets the codes were distilled from stay versioned with them.
"""
from __future__ import annotations

import json
import time

import torch


def train_corpus_teacher(cfg, parts: list[str], text_tokenizer_dir: str | None, grid: int,
                         patch_size: int, device) -> tuple:
    """-> (frozen teacher (model/vqkd/teachers.py API), files for out_dir, metrics)."""
    from safetensors.torch import save

    from model.text_tokenizer import TextTokenizer
    from model.vqkd.corpus_clip import CaptionTower, ConvImageTower, CorpusClip, train_corpus_clip
    from model.vqkd.teachers import FrozenViTTeacher
    from pipelines.visual_tokenizer import progress, tail_mean

    if not text_tokenizer_dir:
        raise ValueError("visual_tokenizer.teacher corpus_clip needs the text tokenizer (captions)")
    tcfg = cfg.corpus_clip
    tokenizer = TextTokenizer(text_tokenizer_dir)
    images, ids = read_pairs(parts, cfg.image_size, cfg.seed, cfg.max_images, tokenizer, tcfg.max_caption_tokens)
    mean, std = cfg.teacher_norm_stats() or _openai_clip()
    torch.manual_seed(cfg.seed)
    image = ConvImageTower(patch_size, tcfg.width)
    text = CaptionTower(tokenizer.vocab_size, tcfg.max_caption_tokens, tcfg.width, tcfg.text_depth, tokenizer.pad_id)
    model = CorpusClip(image, text).to(device)
    started = time.perf_counter()
    history = train_corpus_clip(model, pair_batches(images, ids, tcfg.batch_size, cfg.seed, mean, std, device),
                                tcfg, on_step=progress(tcfg.steps, "visual_tokenizer corpus_clip"))
    metrics = {"corpus_clip_pairs": len(images), "corpus_clip_seconds": round(time.perf_counter() - started, 2),
               "corpus_clip_final_loss": tail_mean(history, "loss")}
    teacher = FrozenViTTeacher(image.eval(), tcfg.width, grid, cfg.image_size, mean, std)
    config = {"kind": "corpus_clip", "patch_size": patch_size, "width": tcfg.width, "image_size": cfg.image_size,
              "mean": list(mean), "std": list(std)}
    state = {k: v.detach().cpu().contiguous() for k, v in image.state_dict().items()}
    files = {"teacher.safetensors": save(state), "teacher.json": json.dumps(config, indent=1).encode()}
    return teacher, files, metrics


def read_pairs(parts: list[str], image_size: int, seed: int, limit: int, tokenizer, max_tokens: int):
    """Unique (by id) pairs of the ``pair`` parts, seeded shuffle, first ``limit`` ->
    (uint8 images (M, 3, S, S), caption ids (M, max_tokens) padded with the pad id)."""
    from pipelines.visual_tokenizer import chosen_rows, decode_uint8

    pair_parts = [p for p in parts if p.replace("\\", "/").rsplit("/", 2)[-2] == "pair"]  # clean_dir/pair/*
    columns = ("image", "caption")
    chosen, rows = chosen_rows(pair_parts, seed, limit, columns, required=columns)
    images, captions = [], []
    for id_ in chosen:
        data, caption = rows[id_]
        x = decode_uint8(data, image_size)
        if x is None:
            continue  # counted by the tokenizer's own image read (undecodable_images)
        images.append(x)
        captions.append(tokenizer.encode(caption, max_tokens))
    if len(images) < 2:
        raise ValueError("visual_tokenizer.teacher corpus_clip: needs at least 2 image-caption pairs "
                         "(clean's pair parts hold fewer)")
    ids = torch.full((len(captions), max_tokens), tokenizer.pad_id, dtype=torch.long)
    for i, c in enumerate(captions):
        ids[i, : len(c)] = torch.tensor(c)
    return torch.stack(images), ids


def pair_batches(images: torch.Tensor, ids: torch.Tensor, batch_size: int, seed: int, mean, std, device):
    """Endless seeded-shuffled batches: (normalised float images (B, 3, S, S), ids (B, L))."""
    from pipelines.visual_tokenizer import shuffled_rows

    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    for rows in shuffled_rows(len(images), batch_size, seed):
        x = images[rows].to(device).float().div(255)
        yield (x - mean) / std, ids[rows].to(device)


def _openai_clip():
    from model.vqkd.teachers import norm_stats

    return norm_stats("openai_clip")


__all__ = ["train_corpus_teacher", "read_pairs", "pair_batches"]
