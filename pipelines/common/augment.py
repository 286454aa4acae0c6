"""Augmented image views for ``tokenize.views_per_image`` > 1: BEiT v2's pretraining transform.

BEiT v2 (unilm/beit2 ``DataAugmentationForBEiT``, run with PRETRAINING.md's flags) draws
for every image, every epoch: ColorJitter(0.4, 0.4, 0.4) (brightness, contrast,
saturation factors uniform in [0.6, 1.4], applied in a random order), a horizontal flip
with p = 0.5, then a random resized crop (area fraction in ``scale`` = [0.2, 1] from
``--min_crop_scale 0.2``, log-uniform aspect ratio in [3/4, 4/3], 10 tries, then the
central fallback) resized bicubically (``--second_interpolation bicubic``) to the
tokenizer's size. Here the same operations run on Pillow (the colour ops are
torchvision's own PIL path: ImageEnhance Brightness / Contrast / Color), without
torchvision, and every draw comes from a generator seeded by (augment seed, sample id,
view index): the same image, id, view and params always give the same pixels, so
tokenize's shards stay byte-identical across runs and workers. Pair images are never
flipped (captions say left and right): the flip coin is still drawn, so a pair's crop
and colours are those of the same image as an image sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipelines.common.configs import check
from pipelines.common.seeding import seeded_rng, text_key

JITTER_OPS = ("brightness", "contrast", "saturation")  # torchvision ColorJitter's, hue = 0 as BEiT v2
_ENHANCERS = {"brightness": "Brightness", "contrast": "Contrast", "saturation": "Color"}  # PIL.ImageEnhance
CROP_TRIES = 10


@dataclass(frozen=True)
class AugmentConfig:
    """params.yaml ``tokenize.augment``: the transform of views 1..K-1 (defaults: BEiT v2's)."""

    scale: tuple[float, float] = (0.2, 1.0)                  # crop area / image area (--min_crop_scale 0.2)
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)  # crop aspect ratio w / h, log-uniform
    color_jitter: float = 0.4                                # brightness, contrast, saturation: 1 +- this
    flip: bool = True                                        # horizontal flip, p = 0.5 (never for pairs)
    seed: int = 0                                            # with (id, view): every draw

    def __post_init__(self):
        check(0.0 < self.scale[0] <= self.scale[1] <= 1.0, "tokenize.augment.scale: need 0 < min <= max <= 1")
        check(0.0 < self.ratio[0] <= self.ratio[1], "tokenize.augment.ratio: need 0 < min <= max")
        check(0.0 <= self.color_jitter < 1.0, "tokenize.augment.color_jitter: must be in [0, 1)")


@dataclass(frozen=True)
class ViewParams:
    """The draws of one augmented view."""

    jitter: tuple[tuple[str, float], ...]   # (op in JITTER_OPS, factor) in the order applied; () for none
    flip: bool                              # mirror left-right before the crop
    box: tuple[int, int, int, int]          # crop (left, top, right, bottom) in pixels


def draw_view(cfg: AugmentConfig, sample_id: str, view: int, width: int, height: int,
              allow_flip: bool) -> ViewParams:
    """View ``view``'s parameters for a ``width`` x ``height`` image: a pure function of
    (cfg, sample_id, view, size, allow_flip). The draws come in a fixed order (jitter order,
    jitter factors, flip coin, crop), whatever ``allow_flip`` is."""
    rng = seeded_rng(cfg.seed, text_key(sample_id), view)
    order = rng.permutation(len(JITTER_OPS))
    factors = rng.uniform(max(0.0, 1.0 - cfg.color_jitter), 1.0 + cfg.color_jitter, size=len(JITTER_OPS))
    coin = bool(rng.random() < 0.5)
    box = crop_box(rng, width, height, cfg.scale, cfg.ratio)
    jitter = tuple((JITTER_OPS[i], float(factors[i])) for i in order) if cfg.color_jitter > 0 else ()
    return ViewParams(jitter, cfg.flip and allow_flip and coin, box)


def crop_box(rng: np.random.Generator, width: int, height: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params on ``rng``: (left, top, right, bottom)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height  # fallback: the central crop of the closest allowed aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def apply_view(image, params: ViewParams, size: int) -> np.ndarray:
    """RGB PIL image (W, H) -> the view's pixels (size, size, 3) uint8: jitter, flip, crop, bicubic resize."""
    from PIL import Image, ImageEnhance

    for op, factor in params.jitter:
        image = getattr(ImageEnhance, _ENHANCERS[op])(image).enhance(factor)
    if params.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = image.crop(params.box).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def augmented_views(image, cfg: AugmentConfig, sample_id: str, views: int, size: int,
                    allow_flip: bool) -> list[np.ndarray]:
    """Views 1..views-1 of one image (view 0, the centre crop, is model.images.preprocess's):
    ``views - 1`` arrays (size, size, 3) uint8 from a PIL image."""
    if views <= 1:
        return []
    rgb = image.convert("RGB")
    return [apply_view(rgb, draw_view(cfg, sample_id, v, rgb.width, rgb.height, allow_flip), size)
            for v in range(1, views)]


__all__ = ["AugmentConfig", "ViewParams", "JITTER_OPS", "draw_view", "crop_box", "apply_view", "augmented_views"]
