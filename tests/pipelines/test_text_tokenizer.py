"""text_tokenizer stage: deterministic sentencepiece training on cleaned text + captions."""
from __future__ import annotations

import hashlib
import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model.text_tokenizer import TextTokenizer
from pipelines.common.ray_session import RayConfig
from pipelines.text_tokenizer import TextTokenizerConfig, split_long_text, train_text_tokenizer
from tests.model.test_text_tokenizer import corpus

RAY = RayConfig(num_cpus=4, cpus_per_task=0.5)
COLOURS = ["red", "green", "blue", "yellow"]


def png(rng: random.Random, size=(40, 32)) -> bytes:
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    img.paste(tuple(rng.randrange(256) for _ in range(3)), (rng.randrange(20), rng.randrange(16), 30, 28))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_clean_dir(root, texts: list[str], n_images: int = 4, n_pairs: int = 4, parts: int = 2) -> str:
    """A tiny clean-stage output: text/, image/, pair/ Parquet parts as data/clean/ holds them."""
    rng = random.Random(0)

    def write(kind, rows):
        for p in range(parts):
            chunk = rows[p::parts]
            if not chunk:
                continue
            path = root / kind / f"part-{p:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(chunk), path)

    ident = lambda *xs: hashlib.sha256(repr(xs).encode()).hexdigest()  # noqa: E731
    unique = dict.fromkeys(texts)  # clean dedups exactly, so ids are unique
    write("text", [{"id": ident("t", t), "text": t, "source": "docs"} for t in unique])
    images = [png(rng) for _ in range(n_images + n_pairs)]
    write("image", [{"id": ident("i", b), "image": b, "width": 40, "height": 32, "source": "imgs"}
                    for b in images[:n_images]])
    write("pair", [{"id": ident("p", b), "image": b, "width": 40, "height": 32, "source": "pairs",
                    "caption": f"a {COLOURS[i % 4]} square on a {COLOURS[(i + 1) % 4]} background"}
                   for i, b in enumerate(images[n_images:])])
    return str(root)


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory) -> str:
    return write_clean_dir(tmp_path_factory.mktemp("clean"), corpus())


def test_trains_with_xlmr_ids_and_is_byte_identical(ray_local, clean_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = TextTokenizerConfig(out_dir=str(tmp_path / name), vocab_size=300)
        metrics = train_text_tokenizer(cfg, clean_dir, RAY)
        runs.append((tmp_path / name / "spm.model").read_bytes())
    assert runs[0] == runs[1]
    info = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    assert info == {"vocab_size": 300, "bos_id": 0, "pad_id": 1, "eos_id": 2, "unk_id": 3,
                    "mask_id": 4, "sha256": hashlib.sha256(runs[0]).hexdigest(),
                    "convention": "native", "num_pieces": 300}
    assert metrics["trained"] and metrics["sentences_used"] == metrics["sentences_total"] > 100
    vocab = (tmp_path / "a" / "spm.vocab").read_text().splitlines()
    assert len(vocab) == 300 and [v.split("\t")[0] for v in vocab[:5]] == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = TextTokenizer(str(tmp_path / "a"))
    caption = "a red square on a blue background"
    assert tok.decode(tok.encode(caption)) == caption
    assert 3 not in tok.encode(caption)  # captions were part of the training data


def test_sample_is_capped_and_seeded(ray_local, clean_dir, tmp_path):
    small = lambda seed: TextTokenizerConfig(out_dir=str(tmp_path / str(seed)), vocab_size=120,  # noqa: E731
                                             max_sentences=150, seed=seed)
    m0 = train_text_tokenizer(small(0), clean_dir, RAY)
    m1 = train_text_tokenizer(small(1), clean_dir, RAY)
    assert m0["sentences_used"] == m1["sentences_used"] == 150 < m0["sentences_total"]
    assert m0["sha256"] != m1["sha256"]  # a different seed draws a different sample


def test_pretrained_model_is_copied_not_trained(ray_local, clean_dir, tmp_path):
    first = TextTokenizerConfig(out_dir=str(tmp_path / "first"), vocab_size=300)
    train_text_tokenizer(first, clean_dir, RAY)
    given = tmp_path / "beit3.spm"
    given.write_bytes((tmp_path / "first" / "spm.model").read_bytes())
    cfg = TextTokenizerConfig(out_dir=str(tmp_path / "copy"), pretrained=str(given))
    metrics = train_text_tokenizer(cfg, str(tmp_path / "no-clean-dir-needed"), RAY)
    assert metrics["trained"] is False
    assert (tmp_path / "copy" / "spm.model").read_bytes() == given.read_bytes()


def test_too_large_vocab_is_a_clear_error(ray_local, tmp_path):
    clean = write_clean_dir(tmp_path / "clean", ["tiny corpus", "of two lines"], 0, 0, parts=1)
    cfg = TextTokenizerConfig(out_dir=str(tmp_path / "out"), vocab_size=5000)
    with pytest.raises(Exception, match="vocab_size 5000 may be too large"):
        train_text_tokenizer(cfg, clean, RAY)
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_split_long_text_keeps_every_word():
    text = " ".join(f"word{i}" for i in range(1000))
    pieces = split_long_text(text, 100)
    assert all(len(p) <= 100 for p in pieces)
    assert " ".join(pieces).split() == text.split()
    assert split_long_text("x" * 250, 100) == ["x" * 100, "x" * 100, "x" * 50]
