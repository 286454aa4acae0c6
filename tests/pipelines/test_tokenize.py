"""tokenize stage: one Ray Data job, both tokenizers, exact image views, chunking, row-range units, resume."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from model.text_tokenizer import TextTokenizer
from model.vqkd import VQKD, vqkd_preset
from pipelines.common.ray_session import RayConfig
from pipelines.common.schema import SHARD_SCHEMA
from pipelines.text_tokenizer import TextTokenizerConfig, train_text_tokenizer
from pipelines.tokenize import TokenizeConfig, tokenize_corpus
from tests.model.test_text_tokenizer import corpus
from tests.pipelines.test_text_tokenizer import write_clean_dir

RAY = RayConfig(num_cpus=4, cpus_per_task=0.5)


@pytest.fixture(scope="module")
def inputs(ray_local, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokenize")
    docs = corpus()
    texts = [" ".join(docs[i:i + 12]) for i in range(0, 240, 12)] + docs[240:260]  # long and short docs
    clean = write_clean_dir(root / "clean", texts, n_images=5, n_pairs=6)
    text_dir = str(root / "text_tokenizer")
    train_text_tokenizer(TextTokenizerConfig(out_dir=text_dir, vocab_size=300), clean, RAY)
    torch.manual_seed(0)
    config = vqkd_preset("tiny", image_size=32, encoder_dim=32, encoder_depth=1, encoder_heads=2,
                         decoder_dim=32, decoder_depth=1, decoder_heads=2, n_codes=64, out_dim=8)
    visual_dir = str(root / "visual_tokenizer")
    VQKD(config).save(visual_dir)
    return {"clean": clean, "text": text_dir, "visual": visual_dir, "texts": texts}


@pytest.fixture(scope="module")
def one_part(inputs, tmp_path_factory) -> dict:
    """The same tokenizers over a clean dir of one part per kind (39 unique texts, 9 images, 10 pairs)."""
    clean = write_clean_dir(tmp_path_factory.mktemp("one_part"), inputs["texts"], n_images=9, n_pairs=10, parts=1)
    return inputs | {"clean": clean}


def run(inputs, out, num_actors=1, **kw) -> dict:
    cfg = TokenizeConfig(out_dir=str(out), num_actors=num_actors, **{"batch_size": 4, **kw})
    return tokenize_corpus(cfg, inputs["clean"], inputs["text"], inputs["visual"], RAY)


def parts(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}


def rows(out, kind) -> list[dict]:
    return [r for p in sorted((out / kind).glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_outputs_are_exact_and_byte_identical(inputs, tmp_path):
    metrics = run(inputs, tmp_path / "a", num_actors=2)
    run(inputs, tmp_path / "b")  # one actor instead of two: same bytes
    files = parts(tmp_path / "a")
    assert files == parts(tmp_path / "b")
    assert set(files) == {f"{k}/part-{p:05d}-00000.parquet" for k in ("text", "image", "pair") for p in range(2)}
    for name in files:
        assert pq.read_table(tmp_path / "a" / name).schema.equals(SHARD_SCHEMA, check_metadata=False)
    assert metrics["image_rows_out"] == 5 and metrics["pair_rows_out"] == 6
    assert metrics["parts_done"] == metrics["units_done"] == metrics["units"] == 6

    info = json.loads((tmp_path / "a" / "tokenizers.json").read_text())
    tok = TextTokenizer(inputs["text"])
    assert info["text"]["sha256"] == tok.sha256 and info["text"]["mask_id"] == tok.mask_id
    assert info["visual"]["n_codes"] == 64 and len(info["visual"]["sha256"]) == 64

    vqkd = VQKD.load(inputs["visual"])
    for kind in ("image", "pair"):
        for row in rows(tmp_path / "a", kind):
            assert row["modality"] == kind and row["source"] == ("pairs" if kind == "pair" else "imgs")
            view = Image.open(io.BytesIO(row["image"]))
            assert view.format == "PNG" and view.size == (32, 32)
            x = torch.from_numpy(np.asarray(view.convert("RGB")).copy()).permute(2, 0, 1)
            codes = vqkd.codes(x.float().div(255)[None])[0].tolist()
            assert row["visual_tokens"] == codes and len(codes) == 4  # the stored view is what was tokenized
            if kind == "pair":
                assert row["text_ids"][0] == 0 and row["text_ids"][-1] == 2
                assert "square on a" in tok.decode(row["text_ids"])
            else:
                assert row["text_ids"] is None


def test_long_texts_are_chunked_without_losing_tokens(inputs, tmp_path):
    metrics = run(inputs, tmp_path / "out", max_text_tokens=16, max_caption_tokens=5)
    tok = TextTokenizer(inputs["text"])
    out_rows = rows(tmp_path / "out", "text")
    by_id = {r["id"]: r for r in out_rows}
    docs = [r for p in sorted((Path(inputs["clean"]) / "text").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    chunked = 0
    for doc in docs:
        body = tok.encode_body(doc["text"])
        if len(body) <= 14:
            assert by_id[doc["id"]]["text_ids"] == [0, *body, 2]
            continue
        chunked += 1
        pieces = [by_id[hashlib.sha256(f"{doc['id']}:{k}".encode()).hexdigest()]["text_ids"]
                  for k in range(-(-len(body) // 14))]
        assert all(p[0] == 0 and p[-1] == 2 and len(p) <= 16 for p in pieces)
        assert [t for p in pieces for t in p[1:-1]] == body  # nothing lost, nothing repeated
    assert chunked >= 20 and metrics["text_chunked_docs"] == chunked
    assert len(out_rows) == metrics["text_rows_out"] == len(by_id)
    pairs = rows(tmp_path / "out", "pair")
    assert all(len(r["text_ids"]) == 5 and r["text_ids"][-1] == 2 for r in pairs)
    assert metrics["pair_truncated_captions"] == 6


def test_units_give_the_rows_of_whole_parts(one_part, tmp_path):
    """Several row-range units per part give the rows one unit per part gives, in the same order."""
    whole = run(one_part, tmp_path / "whole", batch_size=2, rows_per_task=1000)
    split = run(one_part, tmp_path / "split", batch_size=2, rows_per_task=3)
    assert set(parts(tmp_path / "whole")) == {f"{k}/part-00000-00000.parquet" for k in ("text", "image", "pair")}
    # text: 39 rows in ranges of 3; images: ranges rounded up to a multiple of batch_size (4)
    assert sorted(parts(tmp_path / "split")) == [f"{k}/part-00000-{u:05d}.parquet" for k, n in
                                                 (("image", 3), ("pair", 3), ("text", 13)) for u in range(n)]
    assert whole["units"] == 3 and split["units"] == split["units_done"] == 19
    assert whole["parts"] == split["parts"] == split["parts_done"] == 3
    for kind in ("text", "image", "pair"):
        assert rows(tmp_path / "split", kind) == rows(tmp_path / "whole", kind)
    assert {k: v for k, v in split.items() if k.startswith(("text_", "image_", "pair_"))} == \
        {k: v for k, v in whole.items() if k.startswith(("text_", "image_", "pair_"))}


def test_one_big_part_spreads_over_every_actor(one_part, tmp_path, monkeypatch):
    from ray.data import DataContext

    # the pool is fully up before the first unit is handed out: which actor starts first is
    # then no matter, the dispatcher gives each of them units
    monkeypatch.setattr(DataContext.get_current(), "wait_for_min_actors_s", 300)
    metrics = run(one_part, tmp_path / "out", num_actors=2, rows_per_task=2)
    assert metrics["parts"] == 3 and metrics["units_done"] == 20 + 3 + 3  # image ranges: batch_size (4) rows
    assert metrics["actor_processes"] == 2


def test_rerun_skips_finished_units(inputs, tmp_path):
    out = tmp_path / "out"
    run(inputs, out, rows_per_task=8)  # text parts: 3 units each (20 rows); image, pair parts: 1 unit each
    reference = parts(out)
    assert len(reference) == 10
    mtimes = {name: os.stat(out / name).st_mtime_ns for name in reference}
    killed = "text/part-00001-00001.parquet"
    (out / killed).unlink()                                   # killed before this unit finished
    (out / "pair" / "part-00000-00000.parquet.tmp-dead").write_bytes(b"half-written")
    (out / "text" / "part-00007-00000.parquet").write_bytes(reference["text/part-00000-00000.parquet"])  # input gone
    (out / "text" / "part-00000.parquet").write_bytes(reference["text/part-00000-00000.parquet"])  # not a unit

    metrics = run(inputs, out, rows_per_task=8)
    assert metrics["units_done"] == 1 and metrics["units_skipped"] == 9 and metrics["units"] == 10
    assert metrics["parts_done"] == 1 and metrics["parts_skipped"] == 5
    assert metrics["image_rows_out"] == 5 and metrics["pair_rows_out"] == 6  # counts cover skipped units
    assert parts(out) == reference and not (out / "pair" / "part-00000-00000.parquet.tmp-dead").exists()
    assert all(os.stat(out / n).st_mtime_ns == t for n, t in mtimes.items() if n != killed)

    # other ranges: text units are redone; image and pair ranges (whole parts) are unchanged
    before = {k: rows(out, k) for k in ("text", "image", "pair")}
    regrouped = run(inputs, out, rows_per_task=16)
    assert regrouped["units"] == 8 and regrouped["units_done"] == 4 and regrouped["units_skipped"] == 4
    assert {k: rows(out, k) for k in ("text", "image", "pair")} == before
    changed = run(inputs, out, rows_per_task=16, max_caption_tokens=8)  # other params: every unit is redone
    assert changed["units_done"] == 8 and changed["parts_done"] == 6


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_resumes(inputs, tmp_path):
    from tests.pipelines.test_pack import kill_when

    run(inputs, tmp_path / "reference", rows_per_task=4)  # 14 units: 5 per text part, 1 per image or pair part
    out = tmp_path / "killed"
    code = ("from pipelines.tokenize import TokenizeConfig, tokenize_corpus; "
            "from pipelines.common.ray_session import RayConfig; "
            f"tokenize_corpus(TokenizeConfig(out_dir={str(out)!r}, batch_size=4, num_actors=1, rows_per_task=4), "
            f"{inputs['clean']!r}, {inputs['text']!r}, {inputs['visual']!r}, RayConfig(num_cpus=4))")
    assert kill_when(code, lambda: out.exists() and any(out.rglob("*.parquet"))), "finished before the kill"

    metrics = run(inputs, out, rows_per_task=4)
    assert metrics["units_skipped"] >= 1 and metrics["units_done"] + metrics["units_skipped"] == metrics["units"] == 14
    assert metrics["parts_done"] + metrics["parts_skipped"] == 6
    assert parts(out) == parts(tmp_path / "reference")
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


@pytest.mark.slow
def test_tokenizers_read_from_s3_give_the_same_parts(inputs, s3_env, tmp_path):
    """The driver reads both tokenizers through pipelines.common.storage and hands the actors their
    bytes: tokenizers on S3 (not visible to the actors' file systems) give identical parts."""
    from pipelines.common import storage

    remote = f"s3://beit3/tokenize-{os.getpid()}"
    for name in ("text", "visual"):
        for path in Path(inputs[name]).iterdir():
            storage.write_bytes(f"{remote}/{name}/{path.name}", path.read_bytes())
    run(inputs, tmp_path / "local")
    cfg = TokenizeConfig(out_dir=str(tmp_path / "s3"), batch_size=4, num_actors=1)
    tokenize_corpus(cfg, inputs["clean"], f"{remote}/text", f"{remote}/visual", RAY)
    assert parts(tmp_path / "s3") == parts(tmp_path / "local")
    assert (tmp_path / "s3" / "tokenizers.json").read_bytes() == (tmp_path / "local" / "tokenizers.json").read_bytes()
