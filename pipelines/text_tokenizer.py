"""text_tokenizer stage: train (or load) the sentencepiece model.

Training input is every cleaned text (``clean_dir/text/*.parquet``, column
``text``) and caption (``clean_dir/pair/*.parquet``, column ``caption``). Long
documents are cut at whitespace into pieces of at most ``max_sentence_chars``
(sentencepiece skips longer sentences). At most ``max_sentences`` pieces are
used: those with the smallest hash of (seed, file, row, piece index), fed to
the trainer in that hash order, so the sample and its order depend only on the
data and the seed. With one trainer thread and sentencepiece's own shuffling
off, the same input gives a byte-identical model.

The ids follow XLM-R (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3); ``<mask>``
is a *control* symbol (id 4), so a literal "<mask>" in a corpus is encoded as
plain characters and never becomes the mask token. A user-given model
(``pretrained``, e.g. the official beit3.spm) is copied instead; see
model/text_tokenizer.py for the layouts it accepts.

Outputs in ``out_dir``: ``spm.model``, ``spm.vocab`` (piece, score per line,
line number = sentencepiece id) and ``tokenizer.json`` (written last).
"""
from __future__ import annotations

import hashlib
import heapq
import io
import time
from dataclasses import dataclass, field
from typing import Literal

from model.text_tokenizer import MASK_PIECE, MODEL_FILE, TextTokenizer
from pipelines.common import storage
from pipelines.common.configs import check
from pipelines.common.ray_session import RayConfig, ray_session

VOCAB_FILE = "spm.vocab"
INFO_FILE = "tokenizer.json"


@dataclass(frozen=True)
class TextTokenizerConfig:
    out_dir: str = field(kw_only=True)
    vocab_size: int = 2000
    pretrained: str | None = None           # existing model (local or s3://): copied, no training
    model_type: Literal["unigram", "bpe"] = "unigram"
    character_coverage: float = 0.9995
    max_sentences: int = 1_000_000          # training sample size (hash-ranked, deterministic)
    max_sentence_chars: int = 2000          # longer documents are cut at whitespace
    seed: int = 0
    num_threads: int = 1                    # trainer threads; 1 keeps the model byte-identical

    def __post_init__(self):
        check(self.vocab_size >= 8, "text_tokenizer.vocab_size: must be >= 8")
        check(0.9 <= self.character_coverage <= 1.0, "text_tokenizer.character_coverage: must be in [0.9, 1]")
        check(self.max_sentences >= 1, "text_tokenizer.max_sentences: must be >= 1")
        check(self.max_sentence_chars >= 16, "text_tokenizer.max_sentence_chars: must be >= 16")
        check(self.num_threads >= 1, "text_tokenizer.num_threads: must be >= 1")


def train_text_tokenizer(cfg: TextTokenizerConfig, clean_dir: str, ray_cfg: RayConfig) -> dict:
    """Train (or copy) the sentencepiece model into ``cfg.out_dir``; returns metrics."""
    start = time.time()
    if cfg.pretrained:
        model_bytes, stats = storage.read_bytes(cfg.pretrained), {"trained": False}
    else:
        inputs = _training_inputs(clean_dir)
        if not inputs:
            raise FileNotFoundError(f"{clean_dir}: no text/*.parquet or pair/*.parquet to train on")
        with ray_session(ray_cfg) as ray:
            task = ray.remote(num_cpus=min(ray_cfg.cpus_per_task * cfg.num_threads, 64))(train_model)
            model_bytes, stats = ray.get(task.remote(cfg, inputs))
    tokenizer = TextTokenizer.from_bytes(model_bytes, cfg.pretrained or "trained model")
    write_tokenizer(cfg.out_dir, model_bytes, tokenizer)
    return {**stats, **tokenizer.special_ids, "vocab_size": tokenizer.vocab_size,
            "num_pieces": tokenizer.num_pieces, "convention": tokenizer.convention,
            "sha256": tokenizer.sha256, "seconds": round(time.time() - start, 2)}


def _training_inputs(clean_dir: str) -> list[tuple[str, str]]:
    """(parquet path, column) for every cleaned text part and pair part, sorted."""
    texts = [(p, "text") for p in storage.list_files(storage.join(clean_dir, "text"), ".parquet")]
    captions = [(p, "caption") for p in storage.list_files(storage.join(clean_dir, "pair"), ".parquet")]
    return texts + captions


def train_model(cfg: TextTokenizerConfig, inputs: list[tuple[str, str]]) -> tuple[bytes, dict]:
    """Sample the training pieces and train sentencepiece; returns (model bytes, stats)."""
    import sentencepiece as spm

    sample, total = sample_sentences(cfg, inputs)
    if not sample:
        raise ValueError("text_tokenizer: the cleaned text and captions are empty; nothing to train on")
    spm.set_random_generator_seed(cfg.seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=model,
            model_type=cfg.model_type, vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            bos_id=0, pad_id=1, eos_id=2, unk_id=3,
            bos_piece="<s>", pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            control_symbols=[MASK_PIECE],
            input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=4 * cfg.max_sentence_chars,  # bytes; UTF-8 is <= 4 per char
            num_threads=cfg.num_threads, minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(f"text_tokenizer: sentencepiece training failed on {len(sample)} sentences "
                         f"(vocab_size {cfg.vocab_size} may be too large for this corpus): {err}") from err
    chars = sum(len(s) for s in sample)
    return model.getvalue(), {"trained": True, "sentences_total": total,
                              "sentences_used": len(sample), "chars_used": chars}


def sample_sentences(cfg: TextTokenizerConfig, inputs: list[tuple[str, str]]) -> tuple[list[str], int]:
    """The ``max_sentences`` pieces with the smallest (seed, file, row, piece) hash, in hash order.

    Memory is bounded by the sample (a max-heap of kept pieces), not the corpus.
    """
    heap: list[tuple[int, str]] = []  # (-key, piece): heap[0] is the largest kept key
    total = 0
    for path, column in inputs:
        name = "/".join(path.rsplit("/", 2)[-2:])  # kind/part-NNNNN.parquet: independent of where clean_dir is
        values = storage.read_parquet(path, columns=[column]).column(column).to_pylist()
        for row, text in enumerate(values):
            for i, piece in enumerate(split_long_text(text or "", cfg.max_sentence_chars)):
                total += 1
                key = _key(cfg.seed, f"{name}:{row}:{i}")
                if len(heap) < cfg.max_sentences:
                    heapq.heappush(heap, (-key, piece))
                elif key < -heap[0][0]:
                    heapq.heapreplace(heap, (-key, piece))
    return [piece for _, piece in sorted(heap, reverse=True)], total


def split_long_text(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into stripped pieces of at most ``max_chars``, at whitespace where possible."""
    pieces = []
    text = text.strip()
    while len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars + 1)
        cut = cut if cut > 0 else max_chars
        pieces.append(text[:cut].strip())
        text = text[cut:].strip()
    if text:
        pieces.append(text)
    return [p for p in pieces if p]


def _key(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "big")


def write_tokenizer(out_dir: str, model_bytes: bytes, tokenizer: TextTokenizer) -> None:
    """spm.model, spm.vocab, then tokenizer.json, built beside out_dir and swapped in whole
    (storage.publish_dir): a kill never leaves a new model next to an old tokenizer.json."""
    staging = storage.staging_dir(out_dir)
    storage.write_bytes(storage.join(staging, MODEL_FILE), model_bytes)
    sp = tokenizer.sp
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    storage.write_bytes(storage.join(staging, VOCAB_FILE), vocab.encode("utf-8"))
    storage.write_json(storage.join(staging, INFO_FILE), {
        "vocab_size": tokenizer.vocab_size, **tokenizer.special_ids, "sha256": tokenizer.sha256,
        "convention": tokenizer.convention, "num_pieces": tokenizer.num_pieces,
    })
    storage.publish_dir(staging, out_dir)
