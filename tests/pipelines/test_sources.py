"""Source readers: every format, local and s3://, confinement to the declared path."""
from __future__ import annotations

import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.clean.sources import ReadLimits, SourceConfig, escapes, iter_lines
from pipelines.clean.units import plan_units
from pipelines.common import storage
from pipelines.common.configs import ParamsError, build
from tests.pipelines.source_fixtures import (
    img2dataset_parquet,
    png,
    read_all,
    reasons,
    write_lines,
    write_tar,
)


def test_source_config_checks_format_per_kind():
    assert build(SourceConfig, {"name": "a", "kind": "pair", "format": "webdataset", "path": "x"}).format == "webdataset"
    with pytest.raises(ParamsError, match="not a text format"):
        build(SourceConfig, {"name": "a", "kind": "text", "format": "folder", "path": "x"})
    with pytest.raises(FileNotFoundError, match="sources.gone.path"):
        plan_units(SourceConfig("gone", "text", "txt", "/nonexistent/dir"), 1)


def test_iter_lines_skips_an_overlong_line_without_losing_the_others(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"first\r\n" + b"x" * (3 << 20) + b"\n\n   \nlast without newline")
    got = list(iter_lines(str(path), max_line_bytes=1000))
    assert got[0] == (1, b"first", 5)
    assert got[1] == (2, None, 3 << 20)       # reported with its length, never held
    assert got[2] == (5, b"last without newline", 20)  # blank lines 3-4 are separators
    assert len(got) == 3


def test_text_txt_jsonl_parquet(tmp_path):
    write_lines(tmp_path / "txt/a.txt", [b"one doc", b"\xff\xfe bad utf8", b"y" * 5000])
    txt = read_all(SourceConfig("t", "text", "txt", str(tmp_path / "txt")))
    assert [r.text for r in txt if not r.reject] == [b"one doc", b"\xff\xfe bad utf8"]  # decoded later
    assert reasons(txt) == {f"{tmp_path}/txt/a.txt:3": "line_too_long"}

    write_lines(tmp_path / "jsonl/sub/a.jsonl", [
        json.dumps({"id": 1, "text": "hello"}).encode(), b"{not json", b"\xff{}", b"[1, 2]",
        json.dumps({"txt": "wrong field"}).encode(), json.dumps({"text": 5}).encode()])
    js = read_all(SourceConfig("j", "text", "jsonl", str(tmp_path / "jsonl")))
    f = f"{tmp_path}/jsonl/sub/a.jsonl"
    assert [r.text for r in js if not r.reject] == ["hello"]
    assert reasons(js) == {f"{f}:2": "malformed_json", f"{f}:3": "invalid_utf8", f"{f}:4": "malformed_json",
                           f"{f}:5": "missing_field", f"{f}:6": "bad_field_type"}

    pq.write_table(pa.table({"text": ["p1", None, "p3"]}), tmp_path / "t.parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "wrong.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    one = read_all(SourceConfig("p", "text", "parquet", str(tmp_path / "t.parquet")))
    assert [r.text for r in one if not r.reject] == ["p1", "p3"]
    assert reasons(one) == {f"{tmp_path}/t.parquet:row1": "missing_field"}
    assert reasons(read_all(SourceConfig("p", "text", "parquet", str(tmp_path / "wrong.parquet")))) == {
        f"{tmp_path}/wrong.parquet": "missing_field"}
    assert reasons(read_all(SourceConfig("p", "text", "parquet", str(tmp_path / "junk.parquet")))) == {
        f"{tmp_path}/junk.parquet": "unreadable_file"}


def test_image_folder_is_recursive_and_confined(tmp_path):
    root = tmp_path / "imgs"
    (root / "a/b").mkdir(parents=True)
    (root / "a/b/deep.png").write_bytes(png())
    (root / "top.JPG").write_bytes(png())        # extension case does not matter; decoding decides
    (root / "notes.txt").write_text("not an image")
    (tmp_path / "secret.png").write_bytes(png())
    os.symlink(tmp_path / "secret.png", root / "link.png")
    recs = read_all(SourceConfig("i", "image", "folder", str(root)))
    assert sorted(os.path.relpath(r.location, root) for r in recs if not r.reject) == ["a/b/deep.png", "top.JPG"]
    assert reasons(recs) == {f"{root}/notes.txt": "unsupported_extension", f"{root}/link.png": "path_escape"}
    assert len(plan_units(SourceConfig("i", "image", "folder", str(root)), 2)) == 2  # 4 files, 2 per unit


def test_pair_jsonl_resolves_relative_paths_and_rejects_escapes(tmp_path):
    root = tmp_path / "pairs"
    (root / "img").mkdir(parents=True)
    (root / "img/ok.png").write_bytes(png())
    (tmp_path / "outside.png").write_bytes(png())
    rows = [{"image": "img/ok.png", "caption": "a red box"}, {"image": "../outside.png", "caption": "c"},
            {"image": str(tmp_path / "outside.png"), "caption": "c"}, {"image": "img/missing.png", "caption": "c"},
            {"image": "img/ok.png"}, {"image": "img/../../outside.png", "caption": "c"}]
    write_lines(root / "captions.jsonl", [json.dumps(r).encode() for r in rows])
    recs = read_all(SourceConfig("p", "pair", "jsonl", str(root / "captions.jsonl")))
    f = f"{root}/captions.jsonl"
    assert [(r.text, r.image == png()) for r in recs if not r.reject] == [("a red box", True)]
    assert reasons(recs) == {f"{f}:2": "path_escape", f"{f}:3": "path_escape", f"{f}:4": "missing_file",
                             f"{f}:5": "missing_field", f"{f}:6": "path_escape"}


def test_escapes_names():
    assert escapes("a/b.jpg") is None and escapes("a..b.jpg") is None
    for bad in ("../x", "a/../../x", "/etc/passwd", "C:\\x", "s3://b/k", "a\\..\\x", ""):
        assert escapes(bad), bad


def test_webdataset_groups_keys_and_rejects_unsafe_members(tmp_path):
    tar = tmp_path / "wds/00000.tar"
    write_tar(tar, [
        ("000.jpg", png()), ("000.txt", b"a caption"), ("000.json", b"{}"),
        ("../evil.txt", b"x"), ("/abs/evil.jpg", png()),
        ("link.jpg", tarfile.SYMTYPE, "/etc/passwd"),
        ("001.png", png()),                       # no caption
        ("002.txt", b"caption only"),             # no image
        ("sub/003.webp", png()), ("sub/003.txt", b"nested key"),
    ])
    pairs = read_all(SourceConfig("w", "pair", "webdataset", str(tmp_path / "wds")))
    t = str(tar)
    assert [(r.location, r.text) for r in pairs if not r.reject] == [(f"{t}:000", b"a caption"), (f"{t}:sub/003", b"nested key")]
    assert reasons(pairs) == {f"{t}:../evil.txt": "path_escape", f"{t}:/abs/evil.jpg": "path_escape",
                              f"{t}:link.jpg": "unsafe_member", f"{t}:001": "missing_caption", f"{t}:002": "missing_image"}
    images = read_all(SourceConfig("w", "image", "webdataset", str(tmp_path / "wds")))
    assert [r.location for r in images if not r.reject] == [f"{t}:000", f"{t}:001", f"{t}:sub/003"]


def test_webdataset_truncated_and_not_a_tar(tmp_path):
    write_tar(tmp_path / "full.tar", [(f"{i:03d}.{e}", png() if e == "jpg" else b"cap") for i in range(4) for e in ("jpg", "txt")])
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "wds").mkdir()
    (tmp_path / "wds/a.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "wds/b.tar").write_bytes(os.urandom(3000))
    (tmp_path / "wds/c.tar").write_bytes(b"")
    recs = read_all(SourceConfig("w", "pair", "webdataset", str(tmp_path / "wds")))
    got = reasons(recs)
    assert got[f"{tmp_path}/wds/a.tar:"] == "truncated_archive"
    assert got[f"{tmp_path}/wds/b.tar:"] == "unreadable_file"
    assert got[f"{tmp_path}/wds/c.tar:"] == "unreadable_file"
    assert sum(not r.reject for r in recs) >= 1  # what came before the break is kept


def test_parquet_images_and_pairs(tmp_path):
    pq.write_table(pa.table({"image": [png(), None]}), tmp_path / "img.parquet")
    hf = pa.array([{"bytes": png(), "path": "x.png"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": hf}), tmp_path / "hf.parquet")
    pq.write_table(pa.table({"image": [png()], "caption": ["a caption"]}), tmp_path / "pair.parquet")
    imgs = read_all(SourceConfig("i", "image", "parquet", str(tmp_path / "img.parquet")))
    assert [r.image == png() for r in imgs if not r.reject] == [True]
    assert reasons(imgs) == {f"{tmp_path}/img.parquet:row1": "missing_field"}
    assert read_all(SourceConfig("h", "image", "parquet", str(tmp_path / "hf.parquet")))[0].image == png()
    (pair,) = read_all(SourceConfig("p", "pair", "parquet", str(tmp_path / "pair.parquet")))
    assert pair.text == "a caption" and pair.image == png()


def test_file_size_limit(tmp_path):
    (tmp_path / "big.png").write_bytes(png() + b"\0" * 5000)
    (rec,) = read_all(SourceConfig("i", "image", "folder", str(tmp_path)), ReadLimits(max_file_bytes=1000, max_line_bytes=10))
    assert rec.reject.reason == "file_too_large"


@pytest.mark.slow
def test_readers_on_s3(s3_env, tmp_path):
    base = "s3://beit3/sources-test"
    storage.write_bytes(f"{base}/text/a.jsonl", b'{"text": "from s3"}\n{bad\n')
    write_tar(tmp_path / "p.tar", [("k.jpg", png()), ("k.txt", b"s3 caption"), ("../x.txt", b"no")])
    storage.write_bytes(f"{base}/pairs/00000.tar", (tmp_path / "p.tar").read_bytes())
    storage.write_bytes(f"{base}/pj/img/a.png", png())
    storage.write_bytes(f"{base}/pj/c.jsonl", b'{"image": "img/a.png", "caption": "x y"}\n{"image": "../a.png", "caption": "x y"}\n')
    text = read_all(SourceConfig("t", "text", "jsonl", f"{base}/text"))
    assert [r.text for r in text if not r.reject] == ["from s3"] and list(reasons(text).values()) == ["malformed_json"]
    pairs = read_all(SourceConfig("p", "pair", "webdataset", f"{base}/pairs"))
    assert [r.text for r in pairs if not r.reject] == [b"s3 caption"] and list(reasons(pairs).values()) == ["path_escape"]
    pj = read_all(SourceConfig("j", "pair", "jsonl", f"{base}/pj/c.jsonl"))
    assert [r.image == png() for r in pj if not r.reject] == [True] and list(reasons(pj).values()) == ["path_escape"]


# ---------------------------------------------------------------- img2dataset parquet, column names

def test_img2dataset_parquet_reads_jpg_column_and_rejects_failed_downloads(tmp_path):
    img2dataset_parquet(tmp_path / "00000.parquet", image=lambda i: png((10 * i, 0, 0)))
    f = f"{tmp_path}/00000.parquet"
    pairs = read_all(SourceConfig("p", "pair", "parquet", str(tmp_path)))
    assert [(r.text, r.image == png((10 * i, 0, 0))) for i, r in enumerate(r for r in pairs if not r.reject)] == [
        ("caption 0", True), ("caption 1", True), ("caption 2", True)]
    assert reasons(pairs) == {f"{f}:row1": "download_failed", f"{f}:row3": "download_failed"}
    assert [r.reject.detail for r in pairs if r.reject] == ["HTTP Error 404 (0)", "HTTP Error 404 (1)"]
    images = read_all(SourceConfig("i", "image", "parquet", f))
    assert sum(not r.reject for r in images) == 3 and set(reasons(images).values()) == {"download_failed"}

    pq.write_table(pa.table({"png": [png()], "caption": ["c"]}), tmp_path / "png.parquet")  # no status columns
    (rec,) = read_all(SourceConfig("p", "pair", "parquet", str(tmp_path / "png.parquet")))
    assert rec.image == png() and rec.text == "c"
    pq.write_table(pa.table({"pixels": [png()], "caption": ["c"]}), tmp_path / "none.parquet")
    (rec,) = read_all(SourceConfig("p", "pair", "parquet", str(tmp_path / "none.parquet")))
    assert (rec.location, rec.reject.reason) == (f"{tmp_path}/none.parquet", "missing_field") and "jpg" in rec.reject.detail


def test_column_keys_map_parquet_and_jsonl_fields(tmp_path):
    pq.write_table(pa.table({"body": ["a doc", None]}), tmp_path / "t.parquet")
    text = read_all(SourceConfig("t", "text", "parquet", str(tmp_path / "t.parquet"), text_column="body"))
    assert [r.text for r in text if not r.reject] == ["a doc"]
    assert [(r.reject.reason, r.reject.detail) for r in text if r.reject] == [("missing_field", "no 'body' field")]
    pq.write_table(pa.table({"pixels": [png()], "alt": ["alt text"], "status": ["failed_to_resize"],
                             "error_message": ["too small"]}), tmp_path / "p.parquet")
    (rec,) = read_all(SourceConfig("p", "pair", "parquet", str(tmp_path / "p.parquet"),
                                   image_column="pixels", caption_column="alt"))
    assert (rec.reject.reason, rec.reject.detail) == ("download_failed", "too small")  # status applies to a mapped column
    (rec,) = read_all(SourceConfig("p", "pair", "parquet", str(tmp_path / "p.parquet"), caption_column="alt"))
    assert rec.reject.reason == "missing_field" and "image" in rec.reject.detail  # no image/jpg/... column

    (tmp_path / "img").mkdir()
    (tmp_path / "img/a.png").write_bytes(png())
    write_lines(tmp_path / "pairs.jsonl", [json.dumps({"file": "img/a.png", "alt": "x"}).encode(),
                                           json.dumps({"image": "img/a.png", "caption": "x"}).encode()])
    pj = read_all(SourceConfig("j", "pair", "jsonl", str(tmp_path / "pairs.jsonl"), image_column="file", caption_column="alt"))
    assert [(r.text, r.image == png()) for r in pj if not r.reject] == [("x", True)]
    assert reasons(pj) == {f"{tmp_path}/pairs.jsonl:2": "missing_field"}
    write_lines(tmp_path / "docs.jsonl", [json.dumps({"content": "from content"}).encode()])
    (rec,) = read_all(SourceConfig("d", "text", "jsonl", str(tmp_path / "docs.jsonl"), text_column="content"))
    assert rec.text == "from content"


def test_source_config_checks_column_keys():
    src = {"name": "a", "kind": "pair", "format": "parquet", "path": "x"}
    assert build(SourceConfig, {**src, "caption_column": "alt", "image_column": "jpg"}, "sources[0]").caption_column == "alt"
    assert SourceConfig("a", "text", "jsonl", "x").text_column is None  # null: today's names
    for bad, key in [({**src, "kind": "text", "format": "jsonl", "caption_column": "alt"}, "caption_column"),
                     ({**src, "text_column": "body"}, "text_column"),
                     ({**src, "format": "webdataset", "image_column": "jpg"}, "image_column"),
                     ({**src, "kind": "image", "format": "folder", "image_column": "jpg"}, "image_column"),
                     ({**src, "caption_column": ""}, "caption_column")]:
        with pytest.raises(ParamsError, match=f"sources.a.{key}"):
            build(SourceConfig, bad, "sources[0]")
    with pytest.raises(ParamsError, match="expected a string"):
        build(SourceConfig, {**src, "caption_column": 3}, "sources[0]")


def test_webdataset_caption_from_json_when_there_is_no_txt(tmp_path):
    tar = tmp_path / "wds/00000.tar"
    write_tar(tar, [
        ("000.jpg", png()), ("000.json", json.dumps({"caption": "from json", "url": "u"}).encode()),
        ("001.jpg", png()), ("001.txt", b"from txt"), ("001.json", json.dumps({"caption": "not this"}).encode()),
        ("002.jpg", png()), ("002.json", json.dumps({"url": "u"}).encode()),
        ("003.jpg", png()), ("003.json", b"{broken"),
    ])
    recs = read_all(SourceConfig("w", "pair", "webdataset", str(tmp_path / "wds")))
    t = str(tar)
    assert [(r.location, r.text) for r in recs if not r.reject] == [(f"{t}:000", "from json"), (f"{t}:001", b"from txt")]
    assert reasons(recs) == {f"{t}:002": "missing_caption", f"{t}:003": "malformed_json"}
