"""Image cleaning steps: safe open, full decode, RGB, geometry, bounded resize, re-encode.

Order matters for safety: the declared canvas size is checked against
``max_pixels`` right after the header is parsed and before any pixel is
decoded, so a 1 KB PNG declaring 100k x 100k pixels costs nothing (Pillow's own
DecompressionBombError, at twice its global limit, is reported the same way).
Size and aspect are checked from the header too (both are unchanged by an
EXIF rotation), so too-small or extreme images are never decoded.

Output encoding: PNG by default. It is lossless, so the stored bytes decode to
exactly the pixels whose hash is the row's id, later stages never stack JPEG
generations, and zlib at a fixed level and strategy (run-length, see
PNG_STRATEGY) is deterministic (byte-identical files for the same inputs).
``encode: jpeg`` (fixed quality, 4:2:0, no optimiser passes, also
deterministic) trades that for ~3x smaller photos.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.configs import check
from pipelines.rejects import Reject, content_id

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
WHITE = (255, 255, 255, 255)
THUMB_SIZE = (8, 8)
# zlib's run-length strategy (Z_RLE): 2.5-5x faster than Pillow's default filtered strategy
# and no larger here (96 px scenes 5.9 KB either way, 512 px photos 92 vs 97 KB); at the
# default the PNG encode was 75-90% of the per-image cost of the clean stage.
PNG_STRATEGY = 3


@dataclass(frozen=True)
class ImageFilterConfig:
    max_pixels: int = 50_000_000     # declared canvas above this: decompression bomb
    min_side: int = 32               # shorter side below this: too small
    max_aspect: float = 4.0          # longer / shorter side above this: extreme aspect
    max_side: int = 512              # longer side is resized down to this (aspect kept)
    encode: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = 95
    png_compress_level: int = 6
    near_dedup: bool = True
    phash_max_distance: int = 2      # perceptual-hash Hamming distance of near-duplicate candidates
    # ...confirmed only if no cell of the 8x8 colour thumbnails differs by more than this (0-255):
    # phash sees luminance structure only, so a yellow circle and a blue triangle at the same
    # spot on a flat background hash alike; re-encodes and resizes keep their colours.
    near_dedup_max_color_diff: int = 24

    def __post_init__(self):
        check(self.max_pixels >= 1, "clean.image.max_pixels: must be >= 1")
        check(1 <= self.min_side <= self.max_side, "clean.image: need 1 <= min_side <= max_side")
        check(self.max_aspect >= 1.0, "clean.image.max_aspect: must be >= 1")
        check(1 <= self.jpeg_quality <= 100, "clean.image.jpeg_quality: must be in [1, 100]")
        check(0 <= self.png_compress_level <= 9, "clean.image.png_compress_level: must be in [0, 9]")
        check(0 <= self.phash_max_distance <= 16, "clean.image.phash_max_distance: must be in [0, 16]")
        check(0 <= self.near_dedup_max_color_diff <= 255, "clean.image.near_dedup_max_color_diff: must be in [0, 255]")


@dataclass(frozen=True)
class CleanImage:
    data: bytes       # re-encoded RGB image
    width: int
    height: int
    id: str           # hash of the RGB pixels and size: exact duplicates share it
    phash: int        # 64-bit perceptual hash (near duplicates are a few bits apart)
    thumb: bytes      # 8x8 RGB area-averaged thumbnail (192 bytes) to confirm near duplicates


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        # Our own max_pixels check below is the limit; Pillow's warning is noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)


def open_checked(data: bytes, cfg: ImageFilterConfig) -> tuple[bytes, Image.Image]:
    """Parse the header only; reject empty, non-image and bomb inputs before decoding."""
    if not data:
        raise Reject("empty_file", "0 bytes")
    try:
        im = _open(data)
    except Image.DecompressionBombError as err:
        raise Reject("decompression_bomb", str(err)) from None
    except UnidentifiedImageError:
        raise Reject("not_an_image", f"not one of {ALLOWED_FORMATS}; starts {data[:16]!r}") from None
    except Exception as err:  # noqa: BLE001 - hostile headers raise all sorts
        raise Reject("corrupt_image", f"{type(err).__name__}: {err}") from None
    w, h = im.size
    if w * h > cfg.max_pixels:
        raise Reject("decompression_bomb", f"declares {w}x{h} = {w * h} pixels > max_pixels {cfg.max_pixels}")
    if w < 1 or h < 1:
        raise Reject("corrupt_image", f"declares {w}x{h}")
    return data, im


def decode(opened: tuple[bytes, Image.Image], cfg: ImageFilterConfig) -> Image.Image:
    """verify() (checksums) on one handle, then a full decode on a fresh one."""
    data, im = opened
    try:
        im.verify()
        im = _open(data)
        if im.format == "JPEG" and max(im.size) > 2 * cfg.max_side:
            im.draft(im.mode, _fit(im.size, cfg.max_side))  # DCT-domain downscale: 4-5x faster
        im.load()
    except Exception as err:  # noqa: BLE001
        reason = "truncated_image" if "truncat" in str(err).lower() else "corrupt_image"
        raise Reject(reason, f"{type(err).__name__}: {err}") from None
    return im


def to_rgb(im: Image.Image, cfg=None) -> Image.Image:
    """EXIF-transpose, then RGB: 16-bit scaled to 8, alpha composited on white."""
    try:
        im = ImageOps.exif_transpose(im) or im
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the pixels wrong
        pass
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im)
        if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255):
            arr = arr.astype(np.uint32) >> 8
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba)
    return im.convert("RGB")


def geometry(opened: tuple[bytes, Image.Image], cfg: ImageFilterConfig) -> tuple[bytes, Image.Image]:
    """Shorter side and aspect ratio, from the header (both unchanged by EXIF rotation)."""
    w, h = opened[1].size
    if min(w, h) < cfg.min_side:
        raise Reject("too_small", f"{w}x{h}: shorter side < min_side {cfg.min_side}")
    if max(w, h) / min(w, h) > cfg.max_aspect:
        raise Reject("extreme_aspect", f"{w}x{h}: aspect {max(w, h) / min(w, h):.1f} > max_aspect {cfg.max_aspect}")
    return opened


def resize(im: Image.Image, cfg: ImageFilterConfig) -> Image.Image:
    if max(im.size) > cfg.max_side:
        im = im.resize(_fit(im.size, cfg.max_side), Image.Resampling.BICUBIC)
    return im


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def encode(im: Image.Image, cfg: ImageFilterConfig) -> CleanImage:
    """Hash the pixels, compute the perceptual hash, and re-encode without metadata."""
    import imagehash

    pixels = im.tobytes()
    bare = Image.frombytes("RGB", im.size, pixels)  # drops info: no EXIF/ICC/text chunks
    buf = io.BytesIO()
    if cfg.encode == "png":
        bare.save(buf, "PNG", compress_level=cfg.png_compress_level, compress_type=PNG_STRATEGY, optimize=False)
    else:
        bare.save(buf, "JPEG", quality=cfg.jpeg_quality, subsampling="4:2:0", optimize=False)
    w, h = im.size
    return CleanImage(
        data=buf.getvalue(), width=w, height=h,
        id=content_id(b"rgb", f"{w}x{h}".encode(), pixels),
        phash=int(str(imagehash.phash(bare)), 16),
        thumb=bare.resize(THUMB_SIZE, Image.Resampling.BOX).tobytes(),
    )


IMAGE_STEPS = (("open", open_checked), ("geometry", geometry), ("decode", decode),
               ("convert", to_rgb), ("resize", resize), ("encode", encode))

__all__ = ["ImageFilterConfig", "CleanImage", "IMAGE_STEPS", "ALLOWED_FORMATS"]
