"""image_filters: originals kept only when nothing changes, metadata stripped, ids unchanged."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipelines.clean.image_filters import IMAGE_STEPS, ImageFilterConfig, phash64, strip_metadata
from pipelines.clean.rejects import run_steps

KEEP, REENCODE = ImageFilterConfig(), ImageFilterConfig(keep_original=False)


def noise_rgb(size=(64, 48), seed=0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), np.uint8), "RGB")


def saved(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def exif(orientation: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112], ex[0x010F] = orientation, "SomeCamera"
    return ex.tobytes()


def decoded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_plain_rgb_is_kept_byte_for_byte_with_the_same_id(fmt):
    data = saved(noise_rgb(), fmt)
    kept, again = run_steps(IMAGE_STEPS, data, KEEP), run_steps(IMAGE_STEPS, data, REENCODE)
    assert kept.data == data and again.data != data and decoded(again.data).format == "PNG"
    # same pixels, so the same id and dedup keys whichever bytes are stored
    assert (kept.id, kept.phash, kept.thumb, kept.width, kept.height) == \
           (again.id, again.phash, again.thumb, again.width, again.height)
    assert decoded(kept.data).tobytes() == decoded(again.data).tobytes()


def test_metadata_is_stripped_from_kept_originals_pixels_untouched():
    im = noise_rgb(seed=1)
    jpeg = saved(im, "JPEG", exif=exif(1), comment=b"gps 51.5N", icc_profile=b"\0" * 128)
    info = PngInfo()
    info.add_text("Author", "someone")
    png = saved(im, "PNG", pnginfo=info, exif=exif(1))
    for data in (jpeg, png):
        out = run_steps(IMAGE_STEPS, data, KEEP)
        stored = decoded(out.data)
        assert out.data != data and stored.format == decoded(data).format
        assert not ({"exif", "comment", "icc_profile", "Author"} & set(stored.info))
        assert stored.tobytes() == decoded(data).convert("RGB").tobytes()
        assert out.id == run_steps(IMAGE_STEPS, data, REENCODE).id


def test_changed_images_are_converted_and_reencoded():
    im = noise_rgb(seed=2)
    cases = {
        "rotated": saved(im, "JPEG", exif=exif(6)),     # EXIF rotation applied: 64x48 -> 48x64
        "too_large": saved(noise_rgb((600, 400), 3), "JPEG"),
        "grey": saved(im.convert("L"), "PNG"),
        "cmyk": saved(im.convert("CMYK"), "JPEG"),
        "alpha": saved(im.convert("RGBA"), "PNG"),
        "webp": saved(im, "WEBP", lossless=True),       # only JPEG/PNG are kept as they come
    }
    for name, data in cases.items():
        out = run_steps(IMAGE_STEPS, data, KEEP)
        stored = decoded(out.data)
        assert stored.format == "PNG" and stored.mode == "RGB", name
        assert not stored.info.get("exif"), name
    assert (run_steps(IMAGE_STEPS, cases["rotated"], KEEP).width, run_steps(IMAGE_STEPS, cases["too_large"], KEEP).width) == (48, 512)


def test_strip_metadata_declines_what_it_cannot_cut_safely():
    assert strip_metadata(b"\xff\xd8\xff\xff\xff\xff") is None       # fill bytes before any segment
    assert strip_metadata(b"\xff\xd8\xff\xe1\x00") is None           # truncated segment
    assert strip_metadata(saved(Image.new("RGB", (8, 8)), "GIF")) is None
    plain = saved(Image.new("RGB", (8, 8)), "PNG")
    assert strip_metadata(plain) == plain  # an 8-bit RGB PNG without metadata: unchanged
    assert strip_metadata(saved(Image.new("L", (8, 8)), "PNG")) is None  # not 8-bit truecolour


def test_phash64_equals_imagehash_phash():
    import imagehash

    images = [noise_rgb((64, 48), seed) for seed in range(5)] + [Image.new("RGB", (40, 40), (9, 200, 30))]
    images += [decoded(saved(noise_rgb((96, 96), 7).resize((12, 12)).resize((96, 96)), "JPEG"))]
    for im in images:  # all <= 96 px: the same bits
        assert phash64(im) == int(str(imagehash.phash(im)), 16)
    for seed in range(3):  # larger: box-reduced first (3x faster), a few bits apart at most
        im = noise_rgb((48, 36), seed).resize((512, 384), Image.Resampling.BICUBIC)
        assert bin(phash64(im) ^ int(str(imagehash.phash(im)), 16)).count("1") <= 4
