"""Image transforms: encoded bytes -> the backbone's input tensor, and BEiT v2's tokenizer view.

Shard images are stored at the exact view the visual tokenizer saw (DESIGN §5): decode, RGB,
scale to [0, 1], then the official BEiT-3 normalisation (x - 0.5) / 0.5 (mean = std = 0.5
per channel), which maps to [-1, 1]. A model whose image size differs from the tokenizer's
(BEiT v2's two resolutions of one crop, e.g. the giant's patch 14 at 224 on codes of a
256-px patch-16 view) sees the view resized by :func:`resize_views`.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def to_model_input(png_or_jpeg_bytes: bytes, image_size: int | None = None) -> torch.Tensor:
    """Decode PNG/JPEG bytes -> FloatTensor (3, H, W) in [-1, 1].

    image_size, when given, must equal both sides of the decoded image (a clear error
    instead of a silently mis-shaped batch).
    """
    try:
        with Image.open(io.BytesIO(png_or_jpeg_bytes)) as img:
            rgb = np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
    except (OSError, ValueError) as err:  # PIL raises UnidentifiedImageError (an OSError) on junk
        raise ValueError(f"cannot decode image bytes ({len(png_or_jpeg_bytes)} bytes): {err}") from err
    if image_size is not None and rgb.shape[:2] != (image_size, image_size):
        raise ValueError(f"image is {rgb.shape[1]}x{rgb.shape[0]}, expected {image_size}x{image_size}")
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W) in [0, 1]
    return x.sub_(0.5).div_(0.5)


def preprocess(pil_image, image_size: int = 224) -> torch.Tensor:
    """PIL image -> FloatTensor (3, S, S) in [0, 1], BEiT v2's tokenizer transform.

    torchvision Resize(round(S*256/224), bicubic) (shorter side; longer side
    truncated as torchvision does) -> CenterCrop(S) -> ToTensor. S=224 gives 256/224.
    """
    img = pil_image.convert("RGB")
    w, h = img.size
    short = int(round(image_size * 256 / 224))
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    img = img.resize(size, Image.BICUBIC)
    left = int(round((size[0] - image_size) / 2.0))
    top = int(round((size[1] - image_size) / 2.0))
    img = img.crop((left, top, left + image_size, top + image_size))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)


def resize_views(pixels: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, 3, H, W) views in [-1, 1] -> (B, 3, S, S), bicubic with antialiasing (as PIL's
    bicubic resize of the crop), clamped back to [-1, 1]; unchanged when already S x S."""
    if pixels.shape[-2:] == (image_size, image_size):
        return pixels
    out = torch.nn.functional.interpolate(pixels.float(), size=(image_size, image_size), mode="bicubic",
                                          align_corners=False, antialias=True)
    return out.clamp_(-1.0, 1.0).to(pixels.dtype)


__all__ = ["to_model_input", "preprocess", "resize_views"]
