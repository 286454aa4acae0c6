"""demo_data: scene renderer, deterministic corpus layout, held-out splits, the stage CLI."""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import tarfile

import pytest
import yaml
from PIL import Image

from pipelines.common.configs import ParamsError, build
from pipelines.demo_data import (
    MANIFEST,
    DemoDataConfig,
    _Scenes,
    generate_demo_data,
    render_scene,
    stream,
)
from pipelines.demo_data.scenes import COLORS, RELATIONS, SHAPES, SIZES, object_phrase
from pipelines.demo_data.text import stdlib_docs
from tests.project import PROJECT_ROOT, files_under, run

TINY = dict(image_size=32, num_pairs=7, pairs_per_tar=3, num_images=5, max_text_docs=50,
            text_docs_per_file=20, num_retrieval_train=4, num_retrieval_test=3,
            num_probe_train=6, num_probe_val=3)
# webdataset's rule: the key is the path up to the first dot of the basename
WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def tiny(out_dir, **overrides) -> DemoDataConfig:
    return DemoDataConfig(out_dir=str(out_dir), **{**TINY, **overrides})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, generate_demo_data(tiny(out))


def pixel_hash(data: bytes) -> str:
    return hashlib.sha256(Image.open(io.BytesIO(data)).convert("RGB").tobytes()).hexdigest()


# --- render_scene -----------------------------------------------------------

def test_render_scene_is_a_pure_function_of_the_rng():
    a = render_scene(random.Random(7), 64)
    b = render_scene(random.Random(7), 64)
    assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1] and a[2] == b[2]
    assert a[0].size == (64, 64) and a[0].mode == "RGB"


def test_labels_and_captions_state_every_object_and_relation():
    rng = random.Random(0)
    counts = {n: 0 for n in (1, 2, 3)}
    for _ in range(300):
        image, labels, caption = render_scene(rng, 96)
        objects, n = labels["objects"], labels["num_objects"]
        counts[n] += 1
        assert n == len(objects) and (labels["shape"], labels["color"], labels["size"]) == (
            objects[0]["shape"], objects[0]["color"], objects[0]["size"])
        for obj in objects:
            assert obj["shape"] in SHAPES and obj["color"] in COLORS and obj["size"] in SIZES
            assert object_phrase(obj) in caption, (caption, obj)
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            # the box centre has the object's colour (within the jitter and noise)
            centre = image.getpixel(((x0 + x1) // 2, (y0 + y1 * 3) // 4))
            assert max(abs(c - t) for c, t in zip(centre, COLORS[obj["color"]])) <= 40
        assert len({object_phrase(o) for o in objects}) == n  # each phrase names one object
        assert len(labels["relations"]) == n * (n - 1)
        for i, rel, j in labels["relations"]:
            a, b = objects[i]["box"], objects[j]["box"]
            assert rel in RELATIONS
            # the relation holds strictly: boxes are apart along that axis
            assert {"left of": a[2] <= b[0], "right of": a[0] >= b[2],
                    "above": a[3] <= b[1], "below": a[1] >= b[3]}[rel]
        if n >= 2:
            first = {(i, j): r for i, r, j in labels["relations"]}[(0, 1)]
            assert f" {first} " in caption
    assert all(c > 50 for c in counts.values()), counts


def test_render_scene_fits_three_large_shapes_at_small_sizes():
    rng = random.Random(1)
    for _ in range(50):
        _, labels, _ = render_scene(rng, 32, num_objects=3)
        assert labels["num_objects"] == 3
    with pytest.raises(ValueError):
        render_scene(rng, 8)


# --- the corpus ---------------------------------------------------------------

def test_layout_and_counts(corpus):
    out, metrics = corpus
    files = files_under(out)
    assert sorted(f for f in files if f.startswith("pairs/")) == [
        "pairs/00000.tar", "pairs/00001.tar", "pairs/00002.tar"]
    images = [f for f in files if f.startswith("images/")]
    assert len(images) == 5 and all(re.fullmatch(r"images/\d\d/image-\d{7}\.(png|jpg)", f) for f in images)
    assert {f.rsplit(".", 1)[1] for f in images} == {"png", "jpg"}
    for f in images:
        fmt = Image.open(io.BytesIO(files[f])).format
        assert fmt == {"png": "PNG", "jpg": "JPEG"}[f.rsplit(".", 1)[1]]
        assert Image.open(io.BytesIO(files[f])).size == (32, 32)
    manifest = json.loads(files[MANIFEST])
    assert manifest["complete"] and set(manifest["files"]) == set(files) - {MANIFEST}
    assert all(hashlib.sha256(files[f]).hexdigest() == h for f, h in manifest["files"].items())
    assert metrics["pairs"] == 7 and metrics["pair_tars"] == 3 and metrics["images"] == 5
    assert metrics["images_png"] + metrics["images_jpg"] == 5
    assert metrics["files"] == len(files) - 1 and metrics["text_docs"] == 50
    assert metrics["retrieval_train"] == 4 and metrics["probe_val"] == 3


def test_pair_tars_group_into_webdataset_samples(corpus):
    out, _ = corpus
    keys = []
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        with tarfile.open(os.path.join(out, "pairs", name)) as tar:
            samples: list[tuple[str, dict]] = []
            for member in tar.getmembers():
                assert member.isfile() and member.mtime == 0 and member.uid == 0
                key, ext = WDS_KEY.match(member.name).groups()
                if not samples or samples[-1][0] != key:  # webdataset groups consecutive members
                    samples.append((key, {}))
                samples[-1][1][ext] = tar.extractfile(member).read()
        for key, sample in samples:
            assert set(sample) == {"jpg", "txt", "json"}
            assert key[:5] == name[:5] and len(key) == 9  # img2dataset: shard + index
            caption, record = sample["txt"].decode(), json.loads(sample["json"])
            assert record["key"] == key and record["caption"] == caption
            assert all(object_phrase(o) in caption for o in record["objects"])
            assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 32)
            keys.append(key)
    assert keys == ["000000000", "000000001", "000000002", "000010000", "000010001",
                    "000010002", "000020000"]


def test_retrieval_split_is_karpathy_format_with_labels(corpus):
    out, _ = corpus
    with open(os.path.join(out, "eval/retrieval/dataset.json")) as f:
        data = json.load(f)
    entries = data["images"]
    assert [e["split"] for e in entries] == ["train"] * 4 + ["test"] * 3
    for e in entries:
        assert os.path.isfile(os.path.join(out, "eval/retrieval", e["filepath"], e["filename"]))
        raw = e["sentences"][0]["raw"]
        assert object_phrase(e["labels"]["objects"][0]) in raw
        assert e["sentences"][0]["tokens"] == re.findall(r"[a-z]+", raw)


@pytest.mark.parametrize("label", ["color", "shape"])
def test_classification_is_an_image_folder_labelled_by_probe_label(tmp_path, label):
    out = tmp_path / label
    metrics = generate_demo_data(tiny(out, probe_label=label, num_pairs=0, num_images=0, max_text_docs=1))
    root = os.path.join(out, "eval/classification")
    with open(os.path.join(root, "labels.json")) as f:
        labels = json.load(f)["images"]
    found = {split: sorted(os.path.relpath(os.path.join(d, n), root)
                           for d, _, names in os.walk(os.path.join(root, split)) for n in names)
             for split in ("train", "val")}
    assert len(found["train"]) == 6 and len(found["val"]) == 3
    classes = {"color": COLORS, "shape": SHAPES}[label]
    for rel in found["train"] + found["val"]:
        name = rel.split("/")[1]
        assert name in classes and labels[rel][label] == name and labels[rel]["num_objects"] == 1
    assert sum(metrics["probe_class_counts"]["train"].values()) == 6 and metrics["probe_label"] == label


def test_an_unknown_probe_label_fails_naming_it(tmp_path):
    with pytest.raises(ParamsError, match="probe_label.*'texture'"):
        tiny(tmp_path, probe_label="texture")


def test_text_is_stdlib_docstrings(corpus):
    out, _ = corpus
    files = sorted(os.listdir(os.path.join(out, "text")))
    assert files == ["docs-00000.jsonl", "docs-00001.jsonl", "docs-00002.jsonl"]
    docs = [json.loads(line) for f in files for line in open(os.path.join(out, "text", f))]
    assert len(docs) == 50 and len({d["id"] for d in docs}) == 50
    words = " ".join(d["text"] for d in docs).lower().split()
    assert words.count("the") > 20 and all(len(d["text"].split()) >= 5 for d in docs)
    assert all(">>>" not in d["text"] for d in docs)


def test_stdlib_text_is_deterministic_and_sizeable():
    docs, missing = stdlib_docs()
    again, _ = stdlib_docs()
    assert docs == again and missing == [] and len(docs) > 3000
    assert len({d.id for d in docs}) == len(docs)


# --- determinism and held-out splits ---------------------------------------------

def test_same_config_gives_identical_bytes(tmp_path, corpus):
    out, metrics = corpus
    again = generate_demo_data(tiny(tmp_path / "again"))
    assert files_under(out) == files_under(tmp_path / "again") and again == metrics
    other = generate_demo_data(tiny(tmp_path / "other", seed=1))
    assert other["sha256"] != metrics["sha256"]


def test_held_out_scenes_never_repeat_training_scenes(corpus):
    out, metrics = corpus
    files = files_under(out)
    assert metrics["duplicate_scenes_redrawn"] == 0
    # pairs are JPEG, so re-render their stream for exact pixels (PNG eval files are lossless)
    pairs_rng = stream(0, "pairs")
    train = {hashlib.sha256(render_scene(pairs_rng, 32)[0].tobytes()).hexdigest() for _ in range(7)}
    train |= {pixel_hash(d) for f, d in files.items() if f.startswith("images/") and f.endswith(".png")}
    held_out = [pixel_hash(d) for f, d in files.items() if f.startswith("eval/") and f.endswith(".png")]
    assert len(set(held_out)) == len(held_out) == 16 and not train & set(held_out)
    # and the first pair really is the first scene of that stream
    with tarfile.open(os.path.join(out, "pairs", "00000.tar")) as tar:
        record = json.loads(tar.extractfile("000000000.json").read())
    assert record["objects"] == render_scene(stream(0, "pairs"), 32)[1]["objects"]


def test_scene_source_redraws_a_scene_it_has_seen():
    scenes = _Scenes(image_size=32)
    first = scenes.draw(stream(0, "x"))[0]
    replay = stream(0, "x")  # the same stream again would repeat `first`
    second = scenes.draw(replay)[0]
    assert scenes.redrawn == 1 and second.tobytes() != first.tobytes()


def test_rerun_replaces_its_own_output_but_refuses_other_folders(tmp_path):
    out = tmp_path / "demo"
    generate_demo_data(tiny(out, num_pairs=6))
    generate_demo_data(tiny(out, num_pairs=2, pairs_per_tar=2))
    assert sorted(os.listdir(out / "pairs")) == ["00000.tar"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not demo data")
    with pytest.raises(FileExistsError, match="no manifest.json"):
        generate_demo_data(tiny(foreign))
    assert (foreign / "keep.txt").read_text() == "not demo data"


def test_config_rejects_bad_values():
    with pytest.raises(ParamsError, match="demo_data.num_pairs"):
        build(DemoDataConfig, {"out_dir": "unused", "num_pairs": -1}, "demo_data")
    with pytest.raises(ParamsError, match="pairs_per_tar"):
        build(DemoDataConfig, {"out_dir": "unused", "pairs_per_tar": 20000}, "demo_data")
    with pytest.raises(ParamsError, match="demo_data.num_shapes"):
        build(DemoDataConfig, {"out_dir": "unused", "num_shapes": 3}, "demo_data")


# --- the stage ----------------------------------------------------------------

def test_stage_cli_writes_corpus_and_metrics(tmp_path):
    with open(os.path.join(PROJECT_ROOT, "params.yaml")) as f:
        params = yaml.safe_load(f)
    params["demo_data"].update(TINY)
    with open(tmp_path / "params.yaml", "w") as f:
        yaml.safe_dump(params, f)
    run(str(tmp_path), "python", "-m", "stages.demo_data", env={"PYTHONPATH": PROJECT_ROOT})
    with open(tmp_path / "metrics" / "demo_data.json") as f:
        metrics = json.load(f)
    assert metrics["pairs"] == 7 and metrics["text_docs"] == 50
    assert os.path.isfile(tmp_path / "data" / "demo" / MANIFEST)
    shutil.rmtree(tmp_path / "data")
