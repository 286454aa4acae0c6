"""Issue 8.1: clean completes on a hostile corpus (built here, never committed).

Every bad row must come out in the rejected output with its specific reason,
every awkward-but-valid image must be kept and converted to RGB, the counts
must reconcile, and nothing may be written outside out_dir.
"""
from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.clean import CleanConfig, clean_sources
from pipelines.clean.sources import SourceConfig
from pipelines.common.ray_session import RayConfig
from tests.pipelines.source_fixtures import write_tar
from tests.pipelines.test_clean import read_kind

BIG_LINE = 3 << 20  # a multi-megabyte line (> max_line_bytes)


def noise(mode: str, size: tuple[int, int], seed: int, fmt: str = "PNG", **save) -> bytes:
    """Random pixels of ``mode``: distinct seeds never near-duplicate each other."""
    rng = np.random.RandomState(seed)
    w, h = size
    if mode == "I;16":
        im = Image.fromarray((rng.rand(h, w) * 65535).astype(np.uint16))
    elif mode == "1":
        im = Image.fromarray(rng.rand(h, w) > 0.5)
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        arr = rng.randint(0, 256, (h, w, bands) if bands > 1 else (h, w), dtype=np.uint8)
        im = Image.fromarray(arr, mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def palette_with_transparency(size=(72, 52)) -> bytes:
    """A P-mode PNG whose index 0 (the top-left 16x16 block) is fully transparent."""
    rng = np.random.RandomState(7)
    idx = rng.randint(1, 256, (size[1], size[0]), dtype=np.uint8)
    idx[:16, :16] = 0
    im = Image.fromarray(idx, "P")
    im.putpalette(rng.randint(0, 256, 768, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=0)
    return buf.getvalue()


def exif_rotated(size=(80, 40)) -> bytes:
    """A JPEG stored 80x40 whose EXIF orientation (6) says: rotate to 40x80."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return noise("RGB", size, 8, "JPEG", exif=exif.tobytes())


def png_declaring(w: int, h: int) -> bytes:
    """A tiny, valid-looking PNG whose header declares a w x h canvas (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (w + 1) * 4)) + chunk(b"IEND", b""))


def bad_crc_png() -> bytes:
    data = bytearray(noise("RGB", (50, 50), 30))
    i = data.index(b"IDAT") + 40
    data[i] ^= 0xFF
    return bytes(data)


# Kept images are recognised by their (unique) output size.
AWKWARD = {  # name: (bytes, output size)
    "cmyk.jpg": (noise("CMYK", (64, 48), 1, "JPEG"), (64, 48)),
    "gray16.png": (noise("I;16", (70, 50), 2), (70, 50)),
    "palette_alpha.png": (palette_with_transparency(), (72, 52)),
    "gray.png": (noise("L", (74, 54), 3), (74, 54)),
    "exif_rotated.jpg": (exif_rotated(), (40, 80)),
    "rgba.png": (noise("RGBA", (76, 56), 4), (76, 56)),
    "gray_alpha.png": (noise("LA", (78, 58), 5), (78, 58)),
    "bilevel.png": (noise("1", (82, 60), 6), (82, 60)),
    "anim.gif": (noise("P", (84, 62), 9, "GIF"), (84, 62)),
    "lossless.webp": (noise("RGB", (86, 64), 10, "WEBP", lossless=True), (86, 64)),
    "big.jpg": (noise("RGB", (800, 600), 11, "JPEG"), (512, 384)),
}


def build_corpus(project, outside):
    """Write the hostile corpus; return (sources, {(source, location): expected reason})."""
    inputs = project / "inputs"
    expect = {}
    outside.mkdir()
    (outside / "secret.png").write_bytes(noise("RGB", (60, 60), 99))

    # -- image folder: broken files of every kind, plus the awkward valid ones
    img = inputs / "images"
    (img / "nested/deeper").mkdir(parents=True)
    ok = noise("RGB", (66, 66), 20)
    near = bytearray(Image.open(io.BytesIO(ok)).tobytes())
    near[0] ^= 1  # one pixel one level off: new pixel hash, same perceptual hash and colours
    near_png = io.BytesIO()
    Image.frombytes("RGB", (66, 66), bytes(near)).save(near_png, "PNG")
    jpg = noise("RGB", (64, 64), 21, "JPEG")
    bad_images = {
        "truncated.jpg": (jpg[: len(jpg) // 2], "truncated_image"),
        "truncated.png": (ok[: len(ok) // 2], "truncated_image"),
        "empty.png": (b"", "empty_file"),
        "text_pretending.jpg": (b"Hello, I am plain text pretending to be a JPEG.\n" * 4, "not_an_image"),
        "random.png": (np.random.RandomState(1).bytes(4096), "not_an_image"),
        "bomb.png": (png_declaring(100_000, 100_000), "decompression_bomb"),
        "bomb_under_pillow_limit.png": (png_declaring(10_000, 10_000), "decompression_bomb"),
        "bad_crc.png": (bad_crc_png(), "corrupt_image"),
        "one_pixel.png": (noise("RGB", (1, 1), 22), "too_small"),
        "strip.png": (noise("RGB", (1000, 40), 23), "extreme_aspect"),
        "notes.txt": (b"not an image at all", "unsupported_extension"),
        "nested/deeper/zz_duplicate.png": (ok, "duplicate"),
        "nested/deeper/zz_near_duplicate.png": (near_png.getvalue(), "near_duplicate"),
    }
    (img / "nested/deeper/a_ok.png").write_bytes(ok)  # listed before its copies
    for name, (data, reason) in bad_images.items():
        (img / name).write_bytes(data)
        expect[("images", str(img / name))] = reason
    os.symlink(outside / "secret.png", img / "escaping_link.png")
    expect[("images", str(img / "escaping_link.png"))] = "path_escape"
    for name, (data, _) in AWKWARD.items():
        (img / name).write_bytes(data)

    # -- image parquet: bytes column with a null and a non-image
    pq.write_table(pa.table({"image": [noise("RGB", (40, 40), 24), None, b"\x00" * 64]}), inputs / "images.parquet")
    expect[("image_parquet", f"{inputs}/images.parquet:row1")] = "missing_field"
    expect[("image_parquet", f"{inputs}/images.parquet:row2")] = "not_an_image"

    # -- pairs as JSONL with image paths relative to the JSONL's folder
    pj = inputs / "pairs_jsonl"
    (pj / "img").mkdir(parents=True)
    for i in range(3):
        (pj / f"img/p{i}.png").write_bytes(noise("RGB", (48, 48), 40 + i))
    (pj / "img/fake.png").write_bytes(b"GIF89a but not really")
    good = {"image": "img/p0.png", "caption": "a photo of random coloured noise"}
    lines = [
        (json.dumps(good).encode(), None),
        (b'{"image": "img/p1.png", "caption": ', "malformed_json"),
        (b'{"image": "img/p1.png", "caption": "caf\xe9 au lait"}', "invalid_utf8"),
        (json.dumps({"image": "../outside/secret.png", "caption": "climbs out"}).encode(), "path_escape"),
        (json.dumps({"image": "img/../../../outside/secret.png", "caption": "climbs out"}).encode(), "path_escape"),
        (json.dumps({"image": str(outside / "secret.png"), "caption": "absolute path"}).encode(), "path_escape"),
        (json.dumps({"image": "img/missing.png", "caption": "no such file"}).encode(), "missing_file"),
        (json.dumps({"image": "img/p1.png", "caption": ""}).encode(), "empty_caption"),
        (json.dumps({"image": "img/p1.png", "caption": " \t\u00a0 "}).encode(), "empty_caption"),
        (json.dumps({"image": "img/p1.png", "caption": "nul \u0000 inside"}).encode(), "nul_bytes"),
        (b'{"image": "img/p1.png", "caption": "lone \\ud800 surrogate"}', "invalid_utf8"),
        (json.dumps({"image": "img/p1.png", "caption": "cat"}).encode(), "caption_too_short"),
        (json.dumps({"image": "img/p1.png", "caption": "x" * BIG_LINE}).encode(), "line_too_long"),
        (json.dumps(good).encode(), "duplicate"),
        (json.dumps({"image": "img/fake.png", "caption": "an image that is not"}).encode(), "not_an_image"),
        (json.dumps({"image": "img/p1.png"}).encode(), "missing_field"),
        (json.dumps([good]).encode(), "malformed_json"),
        (json.dumps({"image": "img/p2.png", "caption": "another fine noise picture"}).encode(), None),
    ]
    (pj / "captions.jsonl").write_bytes(b"\n".join(line for line, _ in lines) + b"\n")
    for n, (_, reason) in enumerate(lines, 1):
        if reason:
            expect[("pairs_jsonl", f"{pj}/captions.jsonl:{n}")] = reason

    # -- pairs as WebDataset tars (img2dataset layout)
    wds = inputs / "pairs_wds"
    t0 = wds / "00000.tar"
    cut = noise("RGB", (64, 64), 50, "JPEG")
    write_tar(t0, [
        ("000000000.jpg", noise("RGB", (64, 64), 51, "JPEG")), ("000000000.txt", b"a fine caption for noise"),
        ("000000000.json", b"{}"),
        ("../evil.txt", b"written outside?"), ("/abs/evil.jpg", noise("RGB", (64, 64), 52, "JPEG")),
        ("000000001.lnk", tarfile.SYMTYPE, "/etc/passwd"),
        ("000000002.jpg", noise("RGB", (64, 64), 53, "JPEG")),
        ("000000003.txt", b"a caption without its image"),
        ("000000004.jpg", noise("RGB", (64, 64), 54, "JPEG")), ("000000004.txt", b"bad \xff\xfe utf8 caption"),
        ("000000005.jpg", cut[: len(cut) // 2]), ("000000005.txt", b"truncated image caption"),
        ("000000006.png", noise("RGB", (1, 1), 55)), ("000000006.txt", b"a one pixel image"),
    ])
    for where, reason in {"../evil.txt": "path_escape", "/abs/evil.jpg": "path_escape", "000000001.lnk": "unsafe_member",
                          "000000002": "missing_caption", "000000003": "missing_image", "000000004": "invalid_utf8",
                          "000000005": "truncated_image", "000000006": "too_small"}.items():
        expect[("pairs_wds", f"{t0}:{where}")] = reason
    full = wds / "full.tmp"
    write_tar(full, [(f"10000000{i}.{e}", noise("RGB", (64, 64), 60 + i, "JPEG") if e == "jpg" else f"caption number {i} here".encode())
                     for i in range(4) for e in ("jpg", "txt")])
    with tarfile.open(full) as tar:
        third = tar.getmembers()[4]  # 100000002.jpg
    (wds / "00001.tar").write_bytes(full.read_bytes()[: third.offset_data + 100])
    full.unlink()
    expect[("pairs_wds", f"{wds}/00001.tar:")] = "truncated_archive"
    (wds / "00002.tar").write_bytes(np.random.RandomState(3).bytes(5000))
    expect[("pairs_wds", f"{wds}/00002.tar:")] = "unreadable_file"

    # -- text as JSONL and as plain lines
    txt = inputs / "text"
    txt.mkdir()
    long_doc = ("The module provides functions for reading and writing files in many formats, with helpers "
                "that check every record and report problems clearly to the caller. Each reader accepts a path "
                "or an open stream, detects compression from the first bytes, and yields one record at a time "
                "so memory stays small even for very large inputs. Writers mirror the readers: they take an "
                "iterable of records, validate the schema once, and flush complete blocks atomically, which "
                "means a crash never leaves a half-written file behind for the next program to trip over.")
    docs = [
        (json.dumps({"text": long_doc}).encode(), None),
        (json.dumps({"text": "Bell\x07 and escape\x1b characters are removed, the document stays."}).encode(), None),
        (json.dumps({"text": "A third perfectly ordinary document about parsing configuration files."}).encode(), None),
        (b'{"text": "unterminated', "malformed_json"),
        (b'{"text": "latin-1 \xe9\xe8 bytes in a UTF-8 file"}', "invalid_utf8"),
        (json.dumps({"text": "a NUL \u0000 hides in this document text"}).encode(), "nul_bytes"),
        (json.dumps({"text": "word " * (BIG_LINE // 5)}).encode(), "line_too_long"),
        (json.dumps({"text": long_doc}).encode(), "duplicate"),
        (json.dumps({"text": long_doc.replace("clearly", "plainly", 1)}).encode(), "near_duplicate"),
        (json.dumps({"text": "too short"}).encode(), "too_short"),
        (json.dumps({"text": " \n\t "}).encode(), "empty"),
        (json.dumps({"content": "wrong field name"}).encode(), "missing_field"),
    ]
    (txt / "docs-00000.jsonl").write_bytes(b"\n".join(line for line, _ in docs) + b"\n")
    for n, (_, reason) in enumerate(docs, 1):
        if reason:
            expect[("text_jsonl", f"{txt}/docs-00000.jsonl:{n}")] = reason
    (inputs / "lines.txt").write_bytes(b"A plain line document that is long enough to keep.\n"
                                       b"raw NUL \x00 byte inside a plain text line\n"
                                       b"invalid \xc3\x28 sequence in a plain text line\n")
    expect[("text_txt", f"{inputs}/lines.txt:2")] = "nul_bytes"
    expect[("text_txt", f"{inputs}/lines.txt:3")] = "invalid_utf8"

    sources = [
        SourceConfig("images", "image", "folder", str(img)),
        SourceConfig("image_parquet", "image", "parquet", str(inputs / "images.parquet")),
        SourceConfig("pairs_jsonl", "pair", "jsonl", str(pj / "captions.jsonl")),
        SourceConfig("pairs_wds", "pair", "webdataset", str(wds)),
        SourceConfig("text_jsonl", "text", "jsonl", str(txt)),
        SourceConfig("text_txt", "text", "txt", str(inputs / "lines.txt")),
    ]
    return sources, expect


def snapshot(root, skip: str) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(dirpath, d) != skip]
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            out[path] = (st.st_size, st.st_mtime_ns)
    return out


def test_clean_survives_hostile_input(ray_local, tmp_path):
    project = tmp_path / "project"
    sources, expect = build_corpus(project, tmp_path / "outside")
    out_dir = str(project / "data/clean")
    before = snapshot(tmp_path, skip=out_dir)

    metrics = clean_sources(sources, CleanConfig(out_dir=out_dir, part_rows=7), RayConfig(num_cpus=4))

    # every bad row is in the rejected output with its specific reason, and nothing else is
    rejected = read_kind(out_dir, "rejected")
    got = {(r["source"], r["location"]): r["reason"] for r in rejected}
    assert len(got) == len(rejected)
    wrong = {k: (got.get(k), v) for k, v in expect.items() if got.get(k) != v}
    assert not wrong, f"(got, expected) per location: {wrong}"
    assert set(got) == set(expect), f"unexpected rejections: {set(got) - set(expect)}"
    assert all(r["id"] and r["step"] and r["detail"] for r in rejected)
    assert len({reason for reason in expect.values()}) >= 25

    # counts reconcile per source and per step
    for name, s in metrics["sources"].items():
        assert s["rows_in"] == s["kept"] + s["rejected"], name
        assert s["rejected"] == sum(1 for (src, _) in expect if src == name), name
    assert metrics["sources"]["pairs_jsonl"]["kept"] == 2 and metrics["sources"]["text_jsonl"]["kept"] == 3
    assert metrics["sources"]["pairs_wds"]["kept"] == 3  # 000000000 + the 2 keys before the cut
    for kind in metrics["kinds"].values():
        assert kind["steps"][-1]["forwarded"] == kind["kept"]

    # every awkward but valid image is kept, as RGB, with the expected geometry
    images = {(r["width"], r["height"]): Image.open(io.BytesIO(r["image"])) for r in read_kind(out_dir, "image")}
    for name, (_, size) in AWKWARD.items():
        assert size in images, f"{name} was not kept"
        im = images[size]
        assert im.mode == "RGB" and im.format == "PNG" and im.size == size, name
    assert images[(72, 52)].getpixel((3, 3)) == (255, 255, 255)          # transparent -> white
    assert 60 < np.asarray(images[(70, 50)]).mean() < 200                 # 16-bit scaled, not clipped
    assert metrics["sources"]["images"]["kept"] == len(AWKWARD) + 1       # + ok.png

    text = {r["text"] for r in read_kind(out_dir, "text")}
    assert "Bell and escape characters are removed, the document stays." in text

    # nothing written outside out_dir, nothing extracted from tars anywhere
    assert snapshot(tmp_path, skip=out_dir) == before
    assert sorted(os.listdir(project / "data")) == ["clean"]
    assert not os.path.exists("/abs/evil.jpg")
    assert not [p for p in snapshot(tmp_path, skip="") if "evil" in os.path.basename(p)]
