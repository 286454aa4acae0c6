"""model.text_tokenizer: XLM-R special ids for our own models and for fairseq-layout models (beit3.spm)."""
from __future__ import annotations

import inspect
import io
import json
import string
import textwrap

import pytest
import sentencepiece as spm

from model.text_tokenizer import TextTokenizer


def corpus() -> list[str]:
    """Real English sentences every machine has: docstrings of a few stdlib modules."""
    docs = [inspect.getdoc(obj) or "" for mod in (json, string, textwrap, inspect)
            for _, obj in inspect.getmembers(mod) if callable(obj)]
    return [line.strip() for doc in docs for line in doc.splitlines() if len(line.strip()) > 20]


def train(tmp_path, name: str, **ids) -> str:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=model,
                                   vocab_size=300, num_threads=1, minloglevel=2, **ids)
    path = tmp_path / name
    path.write_bytes(model.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def native_model(tmp_path_factory) -> str:
    return train(tmp_path_factory.mktemp("native"), "spm.model", bos_id=0, pad_id=1, eos_id=2,
                 unk_id=3, control_symbols=["<mask>"])


@pytest.fixture(scope="module")
def fairseq_model(tmp_path_factory) -> str:
    """sentencepiece's default layout (<unk> 0, <s> 1, </s> 2), as in XLM-R and beit3.spm."""
    return train(tmp_path_factory.mktemp("fairseq"), "beit3.spm")


def test_native_special_ids(native_model):
    tok = TextTokenizer(native_model)
    assert tok.convention == "native"
    assert tok.special_ids == {"bos_id": 0, "pad_id": 1, "eos_id": 2, "unk_id": 3, "mask_id": 4}
    assert [tok.id_to_piece(i) for i in range(5)] == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert tok.vocab_size == tok.num_pieces == 300
    ids = tok.encode("Return a string with the JSON representation.")
    assert ids[0] == 0 and ids[-1] == 2 and all(i > 4 for i in ids[1:-1])
    assert tok.decode(ids) == "Return a string with the JSON representation."


def test_literal_mask_text_is_not_the_mask_token(native_model):
    tok = TextTokenizer(native_model)
    assert tok.mask_id not in tok.encode("a <mask> b <s> </s>")


def test_dir_or_file_and_sha256(native_model, tmp_path):
    import hashlib
    import os
    import shutil

    shutil.copy(native_model, tmp_path / "spm.model")
    a, b = TextTokenizer(str(tmp_path)), TextTokenizer(native_model)
    with open(native_model, "rb") as f:
        assert a.sha256 == b.sha256 == hashlib.sha256(f.read()).hexdigest()
    assert os.path.samefile(a.path, tmp_path / "spm.model")


def test_truncation_keeps_specials(native_model):
    tok = TextTokenizer(native_model)
    text = " ".join(corpus()[:20])
    full = tok.encode(text)
    cut = tok.encode(text, max_len=10)
    assert len(cut) == 10 and cut[0] == 0 and cut[-1] == 2 and cut[1:-1] == full[1:9]
    with pytest.raises(ValueError, match="max_len"):
        tok.encode(text, max_len=2)


def test_fairseq_layout_matches_xlmr_tokenizer_rule(fairseq_model):
    """HuggingFace XLMRobertaTokenizer (used by unilm/beit3 with beit3.spm): fairseq specials
    <s>0 <pad>1 </s>2 <unk>3, piece id = sentencepiece id + 1, sp <unk> -> 3, <mask> = len(sp) + 1."""
    tok = TextTokenizer(fairseq_model)
    sp = spm.SentencePieceProcessor(model_file=fairseq_model)
    assert tok.convention == "fairseq"
    assert tok.vocab_size == sp.get_piece_size() + 2
    assert tok.special_ids == {"bos_id": 0, "pad_id": 1, "eos_id": 2, "unk_id": 3,
                               "mask_id": sp.get_piece_size() + 1}

    def xlmr_ids(text):  # XLMRobertaTokenizer._convert_token_to_id over sp pieces
        specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        return [specials[p] if p in specials else (sp.piece_to_id(p) + 1 if sp.piece_to_id(p) else 3)
                for p in sp.encode(text, out_type=str)]

    text = "Serialize obj to a JSON formatted str \u4e2d\u6587"  # CJK chars are unknown here
    expected = [0, *xlmr_ids(text), 2]
    assert tok.encode(text) == expected
    assert 3 in expected and tok.decode(expected).startswith("Serialize obj")
    assert tok.encode(text, max_len=5) == [0, *xlmr_ids(text)[:3], 2]


def test_unsupported_layout_is_refused(tmp_path):
    path = train(tmp_path, "odd.model", unk_id=5, bos_id=-1, eos_id=-1, pad_id=-1,
                 control_symbols=["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError, match="unsupported sentencepiece id layout"):
        TextTokenizer(path)
