"""Image cleaning steps: safe open, full decode, RGB, geometry, bounded resize, re-encode.

Order matters for safety: the declared canvas size is checked against
``max_pixels`` right after the header is parsed and before any pixel is
decoded, so a 1 KB PNG declaring 100k x 100k pixels costs nothing (Pillow's own
DecompressionBombError, at twice its global limit, is reported the same way).
Size and aspect are checked from the header too (both are unchanged by an
EXIF rotation), so too-small or extreme images are never decoded.

Output bytes: an RGB JPEG or PNG that needs no change (no EXIF rotation, no
alpha, within ``max_side``) is stored as it came, minus its metadata segments
(``keep_original``, as img2dataset does without resizing): it already decodes
to exactly the pixels whose hash is the row's id, and re-encoding it would
cost more than all the other steps together. Every other image (CMYK,
16-bit, palette, grey, alpha, rotated, resized, WebP/GIF/BMP/TIFF) is
converted to RGB and re-encoded: PNG by default. PNG is lossless, so the stored
bytes decode to exactly the hashed pixels, later stages never stack JPEG
generations, and zlib at a fixed level and strategy (run-length, see
PNG_STRATEGY) is deterministic (byte-identical files for the same inputs).
``encode: jpeg`` (fixed quality, 4:2:0, no optimiser passes, also
deterministic) trades that for much smaller photos. Readers take either
format (any Pillow reader does; the clean parts hold no format column).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.clean.rejects import Reject, content_id
from pipelines.common.configs import check

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
WHITE = (255, 255, 255, 255)
THUMB_SIZE = (8, 8)
# phash64: box-reduce first only above 3 x 32 px (the demo's 96 px images: exact imagehash bits)
PHASH_REDUCING_GAP = 3.0
# zlib's run-length strategy (Z_RLE): much faster than Pillow's default filtered strategy and
# no larger on scenes or photos; at the default the PNG encode would dominate the per-image
# cost of the clean stage.
PNG_STRATEGY = 3
# Stored as they came when nothing changes (keep_original); others are re-encoded.
KEEP_FORMATS = ("JPEG", "PNG")
EXIF_ORIENTATION = 0x0112
TRANSPOSING = range(2, 9)  # orientations that ImageOps.exif_transpose rotates or flips
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_KEEP_ANCILLARY = (b"gAMA", b"sRGB", b"pHYs", b"tRNS")  # no personal data; tRNS changes decoding


@dataclass(frozen=True)
class ImageFilterConfig:
    max_pixels: int = 50_000_000     # declared canvas above this: decompression bomb
    min_side: int = 32               # shorter side below this: too small
    max_aspect: float = 4.0          # longer / shorter side above this: extreme aspect
    max_side: int = 512              # longer side is resized down to this (aspect kept)
    encode: Literal["png", "jpeg"] = "png"
    keep_original: bool = True       # store an RGB JPEG/PNG that needs no change as is (metadata stripped)
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
    data: bytes       # RGB JPEG/PNG: the original (metadata stripped) or a re-encode
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


def decode(opened: tuple[bytes, Image.Image], cfg: ImageFilterConfig) -> tuple[bytes, Image.Image]:
    """PNG: verify() (chunk CRCs) on one handle, then a full decode on a fresh one. Pillow's
    verify() checks nothing for the other formats (it only closes the file), so they are
    decoded on the handle already open: a second header parse is a noticeable part of a small
    JPEG's cost."""
    data, im = opened
    try:
        if im.format == "PNG":
            im.verify()
            im = _open(data)
        if im.format == "JPEG" and max(im.size) > 2 * cfg.max_side:
            im.draft(im.mode, _fit(im.size, cfg.max_side))  # DCT-domain downscale: decodes a fraction of the pixels
        im.load()
    except Exception as err:  # noqa: BLE001
        reason = "truncated_image" if "truncat" in str(err).lower() else "corrupt_image"
        raise Reject(reason, f"{type(err).__name__}: {err}") from None
    return data, im


def to_rgb(decoded: tuple[bytes, Image.Image], cfg: ImageFilterConfig) -> tuple[bytes | None, Image.Image]:
    """EXIF-transpose, then RGB: 16-bit scaled to 8, alpha composited on white. Returns
    (the input bytes if they can be stored as they are, else None; the RGB image)."""
    data, im = decoded
    still = getattr(im, "n_frames", 1) == 1  # an APNG's first frame is not its whole file
    original = data if cfg.keep_original and im.format in KEEP_FORMATS and still else None
    try:
        if im.getexif().get(EXIF_ORIENTATION, 1) in TRANSPOSING:
            im, original = ImageOps.exif_transpose(im), None
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the pixels wrong
        pass
    if im.mode == "RGB" and "transparency" not in im.info:
        return original, im  # already RGB: no copy
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im)
        if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255):
            arr = arr.astype(np.uint32) >> 8
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba)
    return None, im.convert("RGB")


def geometry(opened: tuple[bytes, Image.Image], cfg: ImageFilterConfig) -> tuple[bytes, Image.Image]:
    """Shorter side and aspect ratio, from the header (both unchanged by EXIF rotation)."""
    w, h = opened[1].size
    if min(w, h) < cfg.min_side:
        raise Reject("too_small", f"{w}x{h}: shorter side < min_side {cfg.min_side}")
    if max(w, h) / min(w, h) > cfg.max_aspect:
        raise Reject("extreme_aspect", f"{w}x{h}: aspect {max(w, h) / min(w, h):.1f} > max_aspect {cfg.max_aspect}")
    return opened


def resize(rgb: tuple[bytes | None, Image.Image], cfg: ImageFilterConfig) -> tuple[bytes | None, Image.Image]:
    original, im = rgb
    if max(im.size) > cfg.max_side:
        return None, im.resize(_fit(im.size, cfg.max_side), Image.Resampling.BICUBIC)
    return original, im


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def encode(rgb: tuple[bytes | None, Image.Image], cfg: ImageFilterConfig) -> CleanImage:
    """Hash the pixels, compute the perceptual hash, and store the original without its
    metadata or re-encode (no metadata either)."""
    original, im = rgb
    pixels = im.tobytes()
    data = strip_metadata(original) if original is not None else None
    if data is None:
        bare = Image.frombytes("RGB", im.size, pixels)  # drops info: no EXIF/ICC/text chunks
        buf = io.BytesIO()
        if cfg.encode == "png":
            bare.save(buf, "PNG", compress_level=cfg.png_compress_level, compress_type=PNG_STRATEGY, optimize=False)
        else:
            bare.save(buf, "JPEG", quality=cfg.jpeg_quality, subsampling="4:2:0", optimize=False)
        data = buf.getvalue()
    w, h = im.size
    return CleanImage(data=data, width=w, height=h, id=content_id(b"rgb", f"{w}x{h}".encode(), pixels),
                      phash=phash64(im), thumb=im.resize(THUMB_SIZE, Image.Resampling.BOX).tobytes())


def phash64(im: Image.Image) -> int:
    """imagehash.phash(im) (hash_size 8, highfreq_factor 4) as a 64-bit int, bits in row-major
    order: the same operations in the same order, so the same bits, without its per-call
    overhead (ImageHash object, np.median's checks: much of its cost on a small image).
    One difference: an image over PHASH_REDUCING_GAP x 32 px is first box-reduced by an
    integer factor (Pillow's ``reducing_gap``), so LANCZOS runs on far fewer pixels; a few
    bits differ from imagehash's there (near duplicates stay near); smaller ones are unchanged."""
    import scipy.fftpack

    small = im.convert("L").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=PHASH_REDUCING_GAP)
    pixels = np.asarray(small)  # (32, 32) uint8
    low = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)[:8, :8]  # (8, 8) float64
    median = np.sort(low, axis=None)[31:33].mean()  # what np.median computes for 64 values
    return int.from_bytes(np.packbits(low > median).tobytes(), "big")


def strip_metadata(data: bytes) -> bytes | None:
    """The same image without metadata (JPEG APP1-13/15 and COM segments, PNG ancillary
    chunks but gAMA/sRGB/pHYs), or None if its structure is not plain enough to cut safely.
    Pixel data and what decoding reads (JFIF, Adobe, tables, PLTE...) are kept byte for byte."""
    if data[:2] == b"\xff\xd8":
        return _strip_jpeg(data)
    if data[:8] == PNG_SIGNATURE:
        return _strip_png(data)
    return None


def _strip_jpeg(data: bytes) -> bytes | None:
    keep, pos, dropped = [b"\xff\xd8"], 2, False
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xDA:  # start of scan: the entropy-coded data and the rest, verbatim
            keep.append(data[pos:])
            return b"".join(keep) if dropped else data
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or not 0xC0 <= marker <= 0xFE:  # fill bytes, RSTn, TEM: not plain, re-encode
            return None
        if 0xE1 <= marker <= 0xED or marker in (0xEF, 0xFE):  # APP1-13 (EXIF, XMP, ICC...), APP15, COM
            dropped = True
        else:
            keep.append(data[pos:pos + 2 + length])
        pos += 2 + length
    return None


def _strip_png(data: bytes) -> bytes | None:
    if data[12:16] != b"IHDR" or data[24:26] != b"\x08\x02":  # 8-bit truecolour only (not 16-bit RGB)
        return None
    keep, pos, dropped = [PNG_SIGNATURE], 8, False
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, end = data[pos + 4:pos + 8], pos + 12 + length
        if end > len(data):
            return None
        if kind[0] & 0x20 and kind not in PNG_KEEP_ANCILLARY:  # ancillary (lowercase first letter)
            dropped = True
        else:
            keep.append(data[pos:end])
        if kind == b"IEND":
            return b"".join(keep) if dropped else data
        pos = end
    return None


IMAGE_STEPS = (("open", open_checked), ("geometry", geometry), ("decode", decode),
               ("convert", to_rgb), ("resize", resize), ("encode", encode))

__all__ = ["ImageFilterConfig", "CleanImage", "IMAGE_STEPS", "ALLOWED_FORMATS"]
