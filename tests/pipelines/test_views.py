"""tokenize.views_per_image: K = 1 is today's output; K > 1 stores K views per image row
(view 0 the centre crop, pairs never flipped), pack records K, and pretraining takes one
view per epoch by a pure function of (seed, id, epoch), so a resume sees the same views."""
from __future__ import annotations

import hashlib
import io
import json
import random
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from model.task import Masker, MaskingConfig
from model.vqkd import VQKD
from pipelines.common import storage
from pipelines.common.augment import AugmentConfig, apply_view, augmented_views, draw_view
from pipelines.common.configs import ParamsError, build
from pipelines.common.schema import MODALITIES, SHARD_SCHEMA, VIEW_LAYOUT, VIEWS_KEY, shard_schema, shard_table
from pipelines.common.shards import ShardRowReader, split_index
from pipelines.demo_data.scenes import render_scene
from pipelines.pack import PackConfig, pack_shards
from pipelines.pretrain.data import MixedStream, view_index
from pipelines.pretrain.loader import StepLoader, StepSource
from pipelines.tokenize import METADATA_KEY, TokenizeConfig, fingerprint_params
from tests.pipelines.test_pretrain_loader import assert_same_step
from tests.pipelines.test_tokenize import RAY, inputs, parts, rows, run  # noqa: F401  (inputs: a fixture)

K = 3
# The keys every unit fingerprint held before views existed: K = 1 must keep exactly these.
FINGERPRINT_KEYS_BEFORE_VIEWS = {"out_dir", "batch_size", "num_actors", "num_gpus", "max_text_tokens",
                                 "max_caption_tokens", "precision", "png_compress_level", "rows_per_task",
                                 "png_strategy"}


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def scenes(inputs, tmp_path_factory) -> dict:  # noqa: F811
    """test_tokenize's tokenizers over one clean part per kind of demo-like scenes (varied sizes)."""
    root, rng = tmp_path_factory.mktemp("views_clean"), random.Random(0)
    ident = lambda *xs: hashlib.sha256(repr(xs).encode()).hexdigest()  # noqa: E731
    tables = {"text": [{"id": ident("t", t), "text": t, "source": "docs"} for t in dict.fromkeys(inputs["texts"])],
              "image": [], "pair": []}
    for i in range(12):
        image, _, caption = render_scene(rng, 48)
        image = image.resize((48 + 8 * (i % 3), 48 - 4 * (i % 2)))
        kind = "pair" if i % 2 else "image"
        row = {"id": ident(kind, i), "image": png(image), "source": kind}
        tables[kind].append(row | ({"caption": caption} if kind == "pair" else {}))
    for kind, table in tables.items():
        (root / kind).mkdir()
        pq.write_table(pa.Table.from_pylist(table), root / kind / "part-00000.parquet")
    return inputs | {"clean": str(root), "images": {r["id"]: r["image"] for k in ("image", "pair") for r in tables[k]}}


@pytest.fixture(scope="module")
def one_view(scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("k1") / "out"
    run(scenes, out)
    return out


@pytest.fixture(scope="module")
def three_views(scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("k3") / "out"
    metrics = run(scenes, out, views_per_image=K)
    return out, metrics


# ----------------------------------------------------------------------------- params

def test_params_are_typed_and_unknown_keys_fail():
    cfg = build(TokenizeConfig, {"out_dir": "x", "views_per_image": 2, "augment": {"scale": [0.5, 1.0]}}, "tokenize")
    assert cfg.augment == AugmentConfig(scale=(0.5, 1.0)) and cfg.views_per_image == 2
    with pytest.raises(ParamsError, match=r"tokenize\.augment\.hue: unknown key"):
        build(TokenizeConfig, {"out_dir": "x", "augment": {"hue": 0.1}}, "tokenize")
    with pytest.raises(ParamsError, match="tokenize.views_per_image"):
        TokenizeConfig(out_dir="x", views_per_image=0)
    with pytest.raises(ParamsError, match="tokenize.augment.scale"):
        AugmentConfig(scale=(0.5, 0.1))


def test_one_view_keeps_the_fingerprint_params_of_before():
    assert set(fingerprint_params(TokenizeConfig(out_dir="x"))) == FINGERPRINT_KEYS_BEFORE_VIEWS
    assert set(fingerprint_params(TokenizeConfig(out_dir="x", views_per_image=2))) == \
        FINGERPRINT_KEYS_BEFORE_VIEWS | {"views_per_image", "augment"}


# ----------------------------------------------------------------------------- augment

def test_draws_are_pure_in_bounds_and_pairs_never_flip():
    cfg = AugmentConfig()
    params = [draw_view(cfg, f"id{i}", v, 60, 40, allow_flip=True) for i in range(50) for v in (1, 2)]
    assert params == [draw_view(cfg, f"id{i}", v, 60, 40, allow_flip=True) for i in range(50) for v in (1, 2)]
    assert 20 < sum(p.flip for p in params) < 80  # p = 0.5
    for p in params:
        left, top, right, bottom = p.box
        assert 0 <= left < right <= 60 and 0 <= top < bottom <= 40
        assert sorted(op for op, _ in p.jitter) == ["brightness", "contrast", "saturation"]
        assert all(0.6 <= f <= 1.4 for _, f in p.jitter)
    pairs = [draw_view(cfg, f"id{i}", v, 60, 40, allow_flip=False) for i in range(50) for v in (1, 2)]
    assert not any(p.flip for p in pairs)
    assert [(p.jitter, p.box) for p in pairs] == [(p.jitter, p.box) for p in params]  # only the flip differs
    assert draw_view(AugmentConfig(seed=1), "id0", 1, 60, 40, True) != params[0]


def test_views_are_exact_uint8_images_of_the_size():
    image, _, _ = render_scene(random.Random(1), 64)
    views = augmented_views(image, AugmentConfig(), "x", 4, 32, allow_flip=True)
    assert len(views) == 3 and all(v.shape == (32, 32, 3) and v.dtype == np.uint8 for v in views)
    assert augmented_views(image, AugmentConfig(), "x", 1, 32, allow_flip=True) == []
    flat = draw_view(AugmentConfig(color_jitter=0.0, flip=False), "x", 1, 64, 64, True)
    assert flat.jitter == () and not flat.flip
    expected = np.asarray(image.crop(flat.box).resize((32, 32), Image.Resampling.BICUBIC))
    assert np.array_equal(apply_view(image, flat, 32), expected)


# ----------------------------------------------------------------------------- tokenize, pack

def test_one_view_is_todays_output(scenes, one_view, tmp_path):
    run(scenes, tmp_path / "other_augment", augment=AugmentConfig(scale=(0.5, 1.0), seed=7))
    assert parts(one_view) == parts(tmp_path / "other_augment")  # augment params play no part at K = 1
    for path in sorted(one_view.rglob("*.parquet")):
        schema = pq.read_schema(path)
        assert schema.equals(SHARD_SCHEMA, check_metadata=False) and set(schema.metadata) == {METADATA_KEY}


def test_three_views_per_row(scenes, one_view, three_views):
    out, metrics = three_views
    vqkd = VQKD.load(scenes["visual"])
    cfg = AugmentConfig()
    for kind in ("image", "pair"):
        base, got = rows(one_view, kind), rows(out, kind)
        assert len(got) == len(base) == metrics[f"{kind}_rows_out"] == 6  # the row count does not change
        for row, row1 in zip(got, base):
            # view 0 is K = 1's centre crop with its codes
            assert (row["id"], row["image"], row["visual_tokens"]) == (row1["id"], row1["image"], row1["visual_tokens"])
            images, codes = [row["image"], *row["aug_images"]], [row["visual_tokens"], *row["aug_visual_tokens"]]
            assert len(images) == len(codes) == K and len(set(images)) == K  # K distinct views
            for data, grid in zip(images, codes):
                x = torch.from_numpy(pixels(data).copy()).permute(2, 0, 1).float().div(255)[None]
                assert len(grid) == 4 and vqkd.codes(x)[0].tolist() == grid  # each stored view was tokenized
            with Image.open(io.BytesIO(scenes["images"][row["id"]])) as original:
                unflipped = augmented_views(original, cfg, row["id"], K, 32, allow_flip=False)
                flippable = augmented_views(original, cfg, row["id"], K, 32, allow_flip=True)
            stored = [pixels(d) for d in row["aug_images"]]
            expected = unflipped if kind == "pair" else flippable  # pairs: never flipped
            assert all(np.array_equal(a, b) for a, b in zip(stored, expected))
    sizes = {r["id"]: Image.open(io.BytesIO(scenes["images"][r["id"]])).size for r in rows(out, "pair")}
    assert any(draw_view(cfg, i, v, *size, allow_flip=True).flip
               for i, size in sizes.items() for v in range(1, K))  # so the pairs' flips were really turned off
    for path in sorted(out.rglob("*.parquet")):
        schema = pq.read_schema(path)
        assert schema.equals(shard_schema(K), check_metadata=False) and schema.metadata[VIEWS_KEY] == b"3"
    assert all(r["aug_images"] is None and r["aug_visual_tokens"] is None for r in rows(out, "text"))


def test_three_views_rerun_is_byte_identical(scenes, three_views, tmp_path):
    out, _ = three_views
    run(scenes, tmp_path / "again", num_actors=2, views_per_image=K)
    assert parts(out) == parts(tmp_path / "again")


def test_pack_keeps_the_views_and_records_k(ray_local, three_views, one_view, tmp_path):
    out, _ = three_views
    metrics = pack_shards(PackConfig(out_dir=str(tmp_path / "shards"), shard_rows=16), str(out), RAY)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["views_per_image"] == K and manifest["view_layout"] == VIEW_LAYOUT
    assert manifest["schema"] == [f.name for f in shard_schema(K)]
    assert metrics["rows"] == sum(len(rows(out, kind)) for kind in MODALITIES)
    packed = {r["id"]: r for e in manifest["shards"] for r in pq.read_table(tmp_path / "shards" / e["path"]).to_pylist()}
    for row in rows(out, "pair"):
        assert packed[row["id"]]["aug_images"] == row["aug_images"]
    assert split_index(str(tmp_path / "shards"), "train").views_per_image == K

    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    shutil.copy(one_view / "text" / "part-00000-00000.parquet", mixed / "text" / "part-00000-00000.parquet")
    with pytest.raises(ValueError, match="different views_per_image"):
        pack_shards(PackConfig(out_dir=str(tmp_path / "mixed_shards")), str(mixed), RAY)


# ----------------------------------------------------------------------------- pretraining

def test_view_choice_is_a_pure_function_of_seed_id_epoch():
    ids = [f"id{i}" for i in range(40)]
    picks = [[view_index(0, i, e, K) for e in range(6)] for i in ids]
    assert picks == [[view_index(0, i, e, K) for e in range(6)] for i in ids]
    assert {v for p in picks for v in p} == set(range(K))
    assert sum(len(set(p)) > 1 for p in picks) > 30  # most ids change view across epochs
    assert [[view_index(1, i, e, K) for e in range(6)] for i in ids] != picks
    assert all(view_index(s, i, e, 1) == 0 for s in (0, 5) for i in ids for e in range(4))


def write_view_shards(root) -> str:
    """Two train shards of K-view rows whose view v is a solid grey of level 40 v with codes [v] * 4."""
    rows_ = []
    for m in MODALITIES:
        for i in range(10):
            row = {"id": f"{m}-{i}", "modality": m, "text_ids": [0, 5 + i, 2] if m != "image" else None,
                   "image": None, "visual_tokens": None, "source": "s", "aug_images": None, "aug_visual_tokens": None}
            if m != "text":
                views = [png(Image.new("RGB", (32, 32), (40 * v,) * 3)) for v in range(K)]
                row |= {"image": views[0], "visual_tokens": [0] * 4, "aug_images": views[1:],
                        "aug_visual_tokens": [[v] * 4 for v in range(1, K)]}
            rows_.append(row)
    random.Random(0).shuffle(rows_)
    entries = []
    for s, chunk in enumerate((rows_[:15], rows_[15:])):
        rel = f"train/shard-{s:05d}.parquet"
        data = storage.write_parquet(shard_table({k: [r[k] for r in chunk] for k in chunk[0]}, K), str(root / rel))
        entries.append({"path": rel, "split": "train", "rows": len(chunk), "bytes": len(data),
                        "sha256": storage.sha256(data),
                        "rows_by_modality": {m: sum(r["modality"] == m for r in chunk) for m in MODALITIES}})
    storage.write_json(str(root / "manifest.json"), {"shards": entries, "views_per_image": K})
    return str(root)


def test_stream_takes_the_view_of_each_epoch(tmp_path):
    index = split_index(write_view_shards(tmp_path), "train")
    batch = {"text": 2, "image": 4, "pair": 2}
    stream = MixedStream(index, batch, seed=3, rank=0, world_size=1)
    seen: dict[str, set] = {}
    for step in range(12):  # 4.8 epochs of images, 2.4 of pairs
        positions = stream.positions(step)
        got = [r for r in stream.rows(step) if r["modality"] != "text"]
        want = [(m, p) for m in ("image", "pair") for p in positions[m]]
        for row, (m, p) in zip(got, want):
            epoch = stream.orders[m].locate(p)[0]
            v = view_index(3, row["id"], epoch, K)
            assert row["visual_tokens"] == [v] * 4 and pixels(row["image"])[0, 0, 0] == 40 * v
            assert "aug_images" not in row
            seen.setdefault(row["id"], set()).add(v)
    assert any(len(v) > 1 for v in seen.values())  # views change across epochs


def test_evaluation_reads_view_0(tmp_path):
    index = split_index(write_view_shards(tmp_path), "train")
    for m in ("image", "pair"):  # evaluate's reader: the centre crop only, whatever K
        got = [r for s in range(2) for r in ShardRowReader(index, m, cache_size=1).rows_of(s)]
        assert len(got) == 10 and all("aug_images" not in r and r["visual_tokens"] == [0] * 4 for r in got)


def test_resumed_loader_takes_the_same_views(tmp_path):
    index = split_index(write_view_shards(tmp_path), "train")
    masker = Masker(MaskingConfig(), 64, [0, 1, 2, 3], 4, 16)
    source = lambda: StepSource(index, {"text": 2, "image": 4, "pair": 2}, 3, 0, 1, masker, 1, True)  # noqa: E731
    uninterrupted, resumed = StepLoader(source()), StepLoader(source())
    try:
        whole = [uninterrupted.get(s, 10) for s in range(10)]
        later = [resumed.get(s, 10) for s in range(6, 10)]  # a resume at step 6: epoch 2 of the images
    finally:
        uninterrupted.close()
        resumed.close()
    for a, b in zip(whole[6:], later):
        assert_same_step(a, b)
    tokens = [int(t) for step in whole for t in step[0].image.visual_tokens[:, 0]]
    assert set(tokens) == set(range(K))  # the batches really hold augmented views


def test_storage_benchmark_runs():
    from benchmarks.view_storage import measure

    out = measure(images=2, size=32, views=2)
    assert out["codes_per_view"] == 4 and out["png_bytes_augmented_view"] > 0
    assert set(out["bytes_per_image"]) == {1, 2} and set(out["parquet_bytes_per_image_row"]) == {1, 2}
