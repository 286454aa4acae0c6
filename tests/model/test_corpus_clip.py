"""The corpus CLIP teacher: tower shapes, padding, and that contrastive training grounds shape."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from model.vqkd.corpus_clip import (
    CaptionTower,
    ConvImageTower,
    CorpusClip,
    CorpusClipTrainConfig,
    train_corpus_clip,
)
from pipelines.common.linear_probe import linear_probe
from pipelines.demo_data import render_scene
from pipelines.demo_data.scenes import COLORS, SHAPES, SIZES

torch.set_num_threads(1)


@pytest.mark.parametrize("patch, size", [(16, 96), (8, 32)])
def test_image_tower_gives_one_feature_per_patch(patch, size):
    tower = ConvImageTower(patch_size=patch, width=24)
    assert tower(torch.rand(2, 3, size, size)).shape == (2, (size // patch) ** 2, 24)
    with pytest.raises(ValueError, match="power of 2"):
        ConvImageTower(patch_size=14)


def test_caption_padding_changes_nothing():
    torch.manual_seed(0)
    text = CaptionTower(vocab_size=20, max_len=8, width=16, depth=1, pad_id=1).eval()
    short = torch.tensor([[0, 5, 6, 2, 1, 1]])
    longer = torch.tensor([[0, 5, 6, 2, 1, 1, 1, 1]])
    assert torch.allclose(text(short), text(longer), atol=1e-6)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="corpus_clip.warmup_steps"):
        CorpusClipTrainConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="corpus_clip.max_caption_tokens"):
        CorpusClipTrainConfig(max_caption_tokens=2)


WORDS = [*SHAPES, *COLORS, *SIZES]  # caption ids: <s>=0, </s>=2, word k = 3 + k


def scene_pairs(n: int, seed: int):
    """Single-shape 48 px scenes, the caption '{size} {colour} {shape}' as ids, the shape index."""
    rng = random.Random(seed)
    images, ids, shapes = [], [], []
    for _ in range(n):
        image, lab, _ = render_scene(rng, 48, num_objects=1)
        images.append(torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255 - 0.5)
        ids.append([0, *(3 + WORDS.index(lab[k]) for k in ("size", "color", "shape")), 2])
        shapes.append(SHAPES.index(lab["shape"]))
    return torch.stack(images), torch.tensor(ids), torch.tensor(shapes)


def probe_accuracy(model, train, held) -> float:
    """Shape read off the mean patch features by a linear probe fit on the training scenes."""
    with torch.no_grad():
        (fx, fy), (hx, hy) = [(model.image_embedding(x), y) for x, y in (train, held)]
    return linear_probe(fx, fy, hx, hy, len(SHAPES), steps=200, lr=0.01, weight_decay=1e-4, seed=0)["top1"]


def test_contrastive_training_grounds_the_shape_in_the_patch_features():
    """Trained on captions, the mean patch feature (the targets VQ-KD distils are the patch
    features) tells the shapes of held-out scenes apart far better than at initialisation."""
    torch.manual_seed(0)
    model = CorpusClip(ConvImageTower(patch_size=8, width=64),
                       CaptionTower(vocab_size=3 + len(WORDS), max_len=5, width=64, depth=1, pad_id=1))
    x, ids, y = scene_pairs(256, seed=0)
    held = scene_pairs(90, seed=1)
    model.eval()
    before = probe_accuracy(model, (x, y), held[::2])
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            rows = torch.randperm(len(x), generator=g)[:64]
            yield x[rows], ids[rows]

    cfg = CorpusClipTrainConfig(steps=300, batch_size=64, lr=2e-3, warmup_steps=10, width=64, text_depth=1)
    history = train_corpus_clip(model, batches(), cfg)
    assert len(history) == 300 and not model.training
    after = probe_accuracy(model, (x, y), held[::2])
    assert after >= 0.8 and after >= before + 0.2, (before, after)  # chance: 1/3
