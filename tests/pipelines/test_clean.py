"""clean: text/image steps, dedup, and the whole Ray job on a tiny mixed corpus."""
from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, ImageDraw

from pipelines.clean import OUTPUT_SCHEMAS, CleanConfig, clean_sources
from pipelines.clean.image_filters import IMAGE_STEPS, ImageFilterConfig
from pipelines.clean.rejects import Reject, run_steps
from pipelines.clean.sources import SourceConfig
from pipelines.clean.text_filters import TEXT_STEPS, TextFilterConfig, minhash, normalize
from pipelines.common import storage
from pipelines.common.configs import ParamsError, build
from pipelines.common.ray_session import RayConfig
from tests.conftest import PROJECT_ROOT
from tests.pipelines.dedup_reference import PhashIndex, find_duplicates
from tests.pipelines.source_fixtures import write_lines, write_tar
from tests.project import copy_project, run, update_params

TEXT = TextFilterConfig()
RAY = RayConfig(num_cpus=4, cpus_per_task=0.5)


def text_reason(doc) -> str | None:
    try:
        run_steps(TEXT_STEPS, doc, TEXT)
    except Reject as rej:
        return rej.reason
    return None


def scene(seed: int, size=(96, 96), fmt="PNG") -> bytes:
    """A flat background with one coloured ellipse; distinct seeds give distinct images."""
    rng = random.Random(seed)
    im = Image.new("RGB", size, tuple(rng.randrange(180, 256) for _ in range(3)))
    x, y = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
    ImageDraw.Draw(im).ellipse([x, y, x + size[0] // 3, y + size[1] // 3], fill=tuple(rng.randrange(200) for _ in range(3)))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


# ---------------------------------------------------------------- text steps

def test_normalize_nfc_controls_and_whitespace():
    raw = "Cafe\u0301\u00a0 menu\x07\r\n\r\n\r\n\r\n   indented  line  \t\x1b[0m ok\t\n"
    assert normalize(raw) == "Caf\u00e9 menu\n\n   indented line \t[0m ok"
    with pytest.raises(Reject, match="empty"):
        normalize(" \x00\x01 \n\t ")


def test_gopher_c4_filters_keep_prose_and_drop_junk():
    prose = ("Return the number of items in the container. The argument may be a sequence "
             "such as a string, bytes, tuple, list, or range, or a collection.")
    assert text_reason(prose) is None
    assert text_reason(prose.encode()) is None
    assert text_reason(b"caf\xe9 latin-1") == "invalid_utf8"
    assert text_reason("lone \ud800 surrogate") == "invalid_utf8"
    assert text_reason("has a \x00 NUL byte in it") == "nul_bytes"
    assert text_reason("two words") == "too_short"
    assert text_reason("a b c d e f g h i j") == "mean_word_length"
    assert text_reason("#heading #with #many #hashes #here #now") == "symbol_ratio"
    assert text_reason("123 456 789 000 111 222 333 444 555 words") == "few_alpha_words"
    assert text_reason("\n".join(["the same line again"] * 3 + ["one other line here"])) == "duplicate_lines"
    assert text_reason(" ".join(["buy cheap pills now"] * 8)) == "top_ngram"
    assert text_reason("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do.") == "lorem_ipsum"


def test_minhash_is_deterministic_and_similarity_tracks_overlap():
    a = "the quick brown fox jumps over the lazy dog " * 4 + "and then it rests in the warm sun all day"
    b = a.replace("warm sun", "cold rain")
    sa, sb = minhash(a, 128, 5), minhash(b, 128, 5)
    assert np.array_equal(sa, minhash(a, 128, 5)) and sa.dtype == np.uint64
    assert 0.5 < np.mean(sa == sb) < 1.0
    assert np.mean(sa == minhash("completely different words about databases and their indexes today", 128, 5)) < 0.2


# ---------------------------------------------------------------- image steps

def test_image_steps_resize_and_reencode_deterministically():
    cfg = ImageFilterConfig(max_side=64)
    big = run_steps(IMAGE_STEPS, scene(1, size=(200, 100), fmt="JPEG"), cfg)
    assert (big.width, big.height) == (64, 32)
    again = run_steps(IMAGE_STEPS, scene(1, size=(200, 100), fmt="JPEG"), cfg)
    assert big == again
    im = Image.open(io.BytesIO(big.data))
    assert im.format == "PNG" and im.mode == "RGB" and not im.info.get("exif")
    small = run_steps(IMAGE_STEPS, scene(2), ImageFilterConfig())  # 96 px stays 96 px
    assert (small.width, small.height) == (96, 96)
    assert small.data == scene(2)  # an RGB PNG needing no change is kept as it came (keep_original)
    jpeg = run_steps(IMAGE_STEPS, scene(2), ImageFilterConfig(encode="jpeg", keep_original=False))
    assert Image.open(io.BytesIO(jpeg.data)).format == "JPEG" and jpeg.id == small.id  # id = pixels


# ---------------------------------------------------------------- dedup

def test_phash_index_matches_brute_force():
    rng = random.Random(0)
    hashes = [rng.getrandbits(64) for _ in range(300)]
    hashes += [h ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64)) for h in hashes[:50]]
    for d in (0, 2, 5):
        index = PhashIndex(d)
        for i, h in enumerate(hashes):
            expect = next(((j, (h ^ hashes[j]).bit_count()) for j in range(i)
                           if (h ^ hashes[j]).bit_count() <= d and j in index.hashes), None)
            got = index.query(h)
            assert got == expect
            if got is None:
                index.add(h, i)


def test_find_duplicates_keeps_first_occurrence():
    import pyarrow as pa

    docs = ["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu",
            "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda nu",
            "something else entirely with its own words and meaning here today",
            "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"]
    meta = pa.table({"id": ["a", "b", "c", "a"], "location": ["l0", "l1", "l2", "l3"],
                     "minhash": pa.array([minhash(d, 128, 3) for d in docs], pa.list_(pa.uint64()))})
    dups = find_duplicates(meta, "text", near=True, near_threshold=0.7)
    assert [(d.index, d.reason, d.step) for d in dups] == [(3, "duplicate", "exact_dedup"), (1, "near_duplicate", "near_dedup")]
    assert "l0" in dups[0].detail and "l0" in dups[1].detail
    assert [d.index for d in find_duplicates(meta, "text", near=False)] == [3]


def test_dedup_shard_reports_the_bytes_of_its_key_partition(tmp_path):
    """key_bytes (summed into clean's metrics as dedup.bytes_read) is the size of the partition files read."""
    from pipelines.clean.dedup import NearRules
    from pipelines.clean.dedup_shards import KEY_COLUMNS, dedup_shard, write_keys

    rows = pa.table({"order": pa.array(range(40), pa.int64()), "kind": ["text"] * 40, "kept": [True] * 40,
                     "id": [f"{i:064x}" for i in range(40)], "location": [f"in/{i}" for i in range(40)],
                     "bands": pa.array([[1000 * i + b for b in range(3)] for i in range(40)], pa.list_(pa.uint64()))})
    keys = str(tmp_path / "keys")
    write_keys(keys, 0, rows.select(KEY_COLUMNS), 2)
    for shard in range(2):
        out = dedup_shard(keys, [], shard, NearRules(kinds=("text",)), str(tmp_path / "work"))
        files = storage.list_files(os.path.join(keys, f"{shard:05d}"), ".parquet")
        assert out["key_files"] == len(files) == 1
        assert out["key_bytes"] == sum(os.path.getsize(f) for f in files) > 0


# ---------------------------------------------------------------- config

def test_params_section_builds_and_rejects_unknown_keys():
    with open(os.path.join(PROJECT_ROOT, "params.yaml")) as f:
        section = yaml.safe_load(f)["clean"]
    cfg = build(CleanConfig, section, "clean")
    assert cfg.image.max_side >= 96 and cfg.part_rows >= 1
    with pytest.raises(ParamsError, match="clean.text.min_wrds"):
        build(CleanConfig, {**section, "text": {**section["text"], "min_wrds": 3}}, "clean")
    with pytest.raises(ParamsError, match="max_aspect"):
        build(CleanConfig, {**section, "image": {**section["image"], "max_aspect": 0.5}}, "clean")


# ---------------------------------------------------------------- the whole job

def tiny_corpus(root) -> list[SourceConfig]:
    docs = [f"Document {i} explains how the {w} module reads files and returns a list of records to the caller."
            for i, w in enumerate(["csv", "json", "zipfile", "tarfile", "sqlite", "pickle"])]
    write_lines(root / "text/docs-00000.jsonl", [json.dumps({"id": i, "text": d}).encode() for i, d in enumerate(docs)]
                + [json.dumps({"text": docs[0]}).encode(), b"{broken"])
    write_lines(root / "txt/a.txt", [b"Plain text lines are documents, one per line, in this format.", b"tiny"])
    for i in range(5):
        (root / f"images/{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"images/{i % 2}/img{i}.png").write_bytes(scene(i))
    (root / "images/0/z_copy.png").write_bytes(scene(0))  # listed after img0.png
    write_tar(root / "pairs/00000.tar", [m for i in range(4) for m in (
        (f"{i:09d}.jpg", scene(10 + i, fmt="JPEG")), (f"{i:09d}.txt", f"a shape number {i} on a plain background".encode()),
        (f"{i:09d}.json", b"{}"))] + [("000000009.jpg", scene(10, fmt="JPEG")), ("000000009.txt", b"a shape number 0 on a plain background")])
    return [SourceConfig("docs", "text", "jsonl", str(root / "text")),
            SourceConfig("lines", "text", "txt", str(root / "txt/a.txt")),
            SourceConfig("imgs", "image", "folder", str(root / "images")),
            SourceConfig("pairs", "pair", "webdataset", str(root / "pairs"))]


def read_kind(out, kind):
    files = storage.list_files(os.path.join(out, kind), ".parquet")
    return [r for f in files for r in pq.read_table(f).to_pylist()]


@pytest.mark.slow
def test_clean_end_to_end_is_deterministic(ray_local, tmp_path):
    sources = tiny_corpus(tmp_path / "in")
    cfg = CleanConfig(out_dir=str(tmp_path / "out_a"), part_rows=3)
    metrics = clean_sources(sources, cfg, RAY)

    per = metrics["sources"]
    assert per["docs"] == {**per["docs"], "rows_in": 8, "kept": 6,
                           "rejected_by_reason": {"duplicate": 1, "malformed_json": 1}}
    assert per["lines"]["rejected_by_reason"] == {"too_short": 1} and per["lines"]["kept"] == 1
    assert per["imgs"]["rows_in"] == 6 and per["imgs"]["rejected_by_reason"] == {"duplicate": 1}
    assert per["pairs"]["rows_in"] == 5 and per["pairs"]["rejected_by_reason"] == {"duplicate": 1}
    for s in per.values():
        assert s["rows_in"] == s["kept"] + s["rejected"]
    steps = {s["step"]: s for s in metrics["kinds"]["text"]["steps"]}
    assert steps["read"]["dropped"] == 1 and steps["exact_dedup"]["dropped"] == 1 and steps["length"]["dropped"] == 1
    assert metrics["dedup"]["shards"] >= 1 and metrics["dedup"]["bytes_read"] > 0

    out = cfg.out_dir
    assert sorted(os.listdir(out)) == ["image", "pair", "rejected", "text"]
    assert sorted(os.listdir(os.path.join(out, "text"))) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    texts = [r["text"] for r in read_kind(out, "text")]
    assert texts == [json.loads(line)["text"] for line in (tmp_path / "in/text/docs-00000.jsonl").read_text().splitlines()[:6]] + [
        "Plain text lines are documents, one per line, in this format."]  # input order
    for kind in ("text", "image", "pair"):
        rows = read_kind(out, kind)
        assert len({r["id"] for r in rows}) == len(rows)  # unique
        assert pq.read_schema(storage.list_files(os.path.join(out, kind))[0]).equals(OUTPUT_SCHEMAS[kind])
    pairs = read_kind(out, "pair")
    assert all(r["caption"].startswith("a shape number") and Image.open(io.BytesIO(r["image"])).mode == "RGB" for r in pairs)
    rejected = read_kind(out, "rejected")
    assert {(r["source"], r["reason"]) for r in rejected} >= {("docs", "malformed_json"), ("imgs", "duplicate")}
    dup = next(r for r in rejected if r["source"] == "imgs")
    assert dup["location"].endswith("z_copy.png") and "img0.png" in dup["detail"]

    # Same inputs, another out_dir: byte-identical files.
    again = clean_sources(sources, CleanConfig(out_dir=str(tmp_path / "out_b"), part_rows=3), RAY)
    assert again == metrics
    files_a = storage.list_files(out)
    assert [os.path.relpath(f, out) for f in files_a] == [os.path.relpath(f, tmp_path / "out_b") for f in storage.list_files(str(tmp_path / "out_b"))]
    for f in files_a:
        assert storage.sha256_file(f) == storage.sha256_file(f.replace("out_a", "out_b")), f
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


@pytest.mark.slow
def test_stage_cli_reads_params_and_writes_metrics(tmp_path):
    project = copy_project(str(tmp_path / "project"))
    sources = tiny_corpus(tmp_path / "project/inputs")
    update_params(project, {
        "sources": [{"name": s.name, "kind": s.kind, "format": s.format,
                     "path": os.path.relpath(s.path, project)} for s in sources],
        "ray": {"num_cpus": 4}, "clean": {"part_rows": 4},
    })
    run(project, "python", "-m", "stages.clean")
    metrics = json.loads((tmp_path / "project/metrics/clean.json").read_text())
    assert metrics["rows_in"] == metrics["kept"] + metrics["rejected"] == 21
    assert metrics["sources"]["imgs"]["kept"] == 5
    assert sorted(os.listdir(tmp_path / "project/data/clean")) == ["image", "pair", "rejected", "text"]
    assert len(os.listdir(tmp_path / "project/data/clean/text")) == 2  # 7 kept texts, 4 per part


def test_clean_counts_img2dataset_and_compressed_sources_and_fails_on_an_empty_one(ray_local, tmp_path):
    """rows in = kept + rejected per source, failed downloads and a corrupt .gz included; a
    source that yields no row at all (here: no file of its format) fails the stage by name."""
    import gzip

    from tests.pipelines.source_fixtures import img2dataset_parquet, zst

    root = tmp_path / "in"
    (root / "laion").mkdir(parents=True)
    img2dataset_parquet(root / "laion/00000.parquet", image=lambda i: scene(30 + i, fmt="JPEG"))
    docs = [json.dumps({"text": f"Gloss {i} explains how the {w} module reads files and returns records to the caller."}).encode()
            for i, w in enumerate(["csv", "json", "zipfile", "tarfile", "sqlite", "pickle"])]
    write_lines(root / "glosses/a.jsonl", docs[:3])
    (root / "glosses/a.jsonl.gz").write_bytes(gzip.compress((root / "glosses/a.jsonl").read_bytes()))
    (root / "glosses/a.jsonl").unlink()
    (root / "glosses/b.jsonl.zst").write_bytes(zst(b"\n".join(docs[3:]) + b"\n"))
    (root / "glosses/c.jsonl.gz").write_bytes(gzip.compress(b"\n".join(docs))[:40])  # cut short
    (root / "lines").mkdir()
    for i, w in enumerate(["socket", "select"]):
        (root / f"lines/{i}.txt.gz").write_bytes(gzip.compress(f"A plain line on the {w} module, long enough to keep.\n".encode()))
    sources = [SourceConfig("laion", "pair", "parquet", str(root / "laion")),
               SourceConfig("glosses", "text", "jsonl", str(root / "glosses")),
               SourceConfig("lines", "text", "txt", str(root / "lines"))]

    metrics = clean_sources(sources, CleanConfig(out_dir=str(tmp_path / "out")), RAY)
    per = metrics["sources"]
    for s in per.values():
        assert s["rows_in"] == s["kept"] + s["rejected"]
    assert (per["laion"]["rows_in"], per["laion"]["kept"], per["laion"]["rejected_by_reason"]) == (5, 3, {"download_failed": 2})
    assert (per["glosses"]["rows_in"], per["glosses"]["kept"]) == (7, 6)
    assert per["glosses"]["rejected_by_reason"] == {"corrupt_compressed_file": 1}
    assert (per["lines"]["rows_in"], per["lines"]["kept"]) == (2, 2)
    rejected = {(r["source"], r["location"]): (r["reason"], r["detail"]) for r in read_kind(str(tmp_path / "out"), "rejected")}
    laion = f"{root}/laion/00000.parquet"
    assert rejected[("laion", f"{laion}:row1")] == ("download_failed", "HTTP Error 404 (0)")
    assert rejected[("laion", f"{laion}:row3")] == ("download_failed", "HTTP Error 404 (1)")
    assert rejected[("glosses", f"{root}/glosses/c.jsonl.gz")][0] == "corrupt_compressed_file"
    assert len(rejected) == 3

    (root / "empty").mkdir()
    (root / "empty/notes.md").write_text("no jsonl file here")
    with pytest.raises(RuntimeError, match="source 'gone' yielded no rows"):
        clean_sources([sources[2], SourceConfig("gone", "text", "jsonl", str(root / "empty"))],
                      CleanConfig(out_dir=str(tmp_path / "out_empty")), RAY)
    assert not os.path.exists(tmp_path / "out_empty")  # nothing published


# ---------------------------------------------------------------- map units

WORDS = ["module", "returns", "reads", "files", "records", "caller", "string", "number", "value", "object", "list",
         "parser", "socket", "thread", "buffer", "stream", "format", "option", "handler", "result", "default"]


def corpus_lines(n: int, seed: int) -> list[bytes]:
    """Short JSON documents with exact copies, near copies (one word changed), malformed and
    blank lines, and documents the text filters reject."""
    rng, docs, lines = random.Random(seed), [], []
    for k in range(n):
        r = rng.random()
        if docs and r < 0.1:
            doc = rng.choice(docs)
        elif docs and r < 0.2:
            words = rng.choice(docs).split()
            words[rng.randrange(len(words))] = "changed"
            doc = " ".join(words)
        elif r < 0.22:
            lines.append(b"{not json" if r < 0.21 else b"")
            continue
        elif r < 0.24:
            doc = "two words"
        else:
            doc = f"Document {k} " + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(20, 40)))
            docs.append(doc)
        lines.append(json.dumps({"text": doc}).encode())
    return lines


def clean_twice(tmp_path, sources, small: int, **kw) -> None:
    """Clean with map units of ``small`` bytes and with one unit per file: the same metrics
    (but ``dedup``'s key files: one per map chunk and shard) and byte-identical files (kept
    ids, rejected rows with locations and details, parts)."""
    runs = {}
    for name, unit_bytes in (("one", 2**40), ("split", small)):
        cfg = CleanConfig(out_dir=str(tmp_path / name), unit_bytes=unit_bytes, **kw)
        runs[name] = clean_sources(sources, cfg, RAY)
        runs[name].pop("dedup")
    assert runs["split"] == runs["one"]
    files = {n: [os.path.relpath(f, tmp_path / n) for f in storage.list_files(str(tmp_path / n))] for n in runs}
    assert files["split"] == files["one"] and files["one"]
    for f in files["one"]:
        assert storage.sha256_file(str(tmp_path / "one" / f)) == storage.sha256_file(str(tmp_path / "split" / f)), f
    assert runs["one"]["sources"][sources[0].name]["rejected_by_reason"].keys() >= {"duplicate", "near_duplicate"}


@pytest.mark.slow
def test_splitting_a_big_jsonl_file_into_units_is_invisible(ray_local, tmp_path):
    from pipelines.clean.units import plan_units

    path = tmp_path / "in/big.jsonl"
    write_lines(path, corpus_lines(20_000, 0))
    source = SourceConfig("big", "text", "jsonl", str(path))
    small = path.stat().st_size // 7 + 1
    units = plan_units(source, 1, small)
    assert len(units) == 7 and units[0].span.start == 0 and units[-1].span.end == path.stat().st_size
    clean_twice(tmp_path, [source], small, part_rows=1000)


def test_splitting_parquet_by_row_groups_is_invisible(ray_local, tmp_path):
    from pipelines.clean.units import plan_units

    texts = [json.loads(line)["text"] if line.startswith(b"{\"") else None for line in corpus_lines(4000, 1)]
    path = tmp_path / "in/docs.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), path, row_group_size=300)
    source = SourceConfig("pq", "text", "parquet", str(path))
    small = path.stat().st_size // 5
    units = plan_units(source, 1, small)
    assert len(units) >= 4 and units[1].span.rows_before == 300 * units[0].span.end
    clean_twice(tmp_path, [source], small, part_rows=700)
