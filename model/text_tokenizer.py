"""Sentencepiece text tokenizer with the XLM-R special ids BEiT-3 uses.

Ids seen by the model: ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3,
plus a ``<mask>`` id. Two model layouts are supported:

- ``native``: the model stores those ids itself (what the text_tokenizer stage
  trains: ``bos_id=0 pad_id=1 eos_id=2 unk_id=3`` and ``<mask>`` as a control
  symbol). Model ids are used as they are; ``vocab_size`` = number of pieces
  (+1 when the model has no ``<mask>`` piece: the mask id is appended).
- ``fairseq``: a model trained with sentencepiece's defaults (``<unk>`` = 0,
  ``<s>`` = 1, ``</s>`` = 2, no pad piece), such as XLM-R's
  ``sentencepiece.bpe.model`` and the official BEiT-3 ``beit3.spm``. The
  official code (unilm/beit3) reads it with HuggingFace's
  ``XLMRobertaTokenizer``, which prepends fairseq's four specials: a piece with
  sentencepiece id ``i >= 3`` gets id ``i + 1``, sentencepiece's ``<unk>`` maps
  to 3, ``<mask>`` = number of pieces + 1 and the vocabulary has pieces + 2
  entries (64002 for beit3.spm). ``encode`` then matches the official
  ``[bos] + tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))[:max_len-2] + [eos]``.

Any other layout is refused with the ids it found.
"""
from __future__ import annotations

import hashlib
import os

import sentencepiece as spm

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MASK_PIECE = "<mask>"
MODEL_FILE = "spm.model"


class TextTokenizer:
    """Encode text to model ids: ``encode(text, max_len) -> [0, ..., 2]``."""

    def __init__(self, dir_or_model_path: str | os.PathLike):
        path = os.fspath(dir_or_model_path)
        if os.path.isdir(path):
            path = os.path.join(path, MODEL_FILE)
        with open(path, "rb") as f:
            self._load(f.read(), path)

    @classmethod
    def from_bytes(cls, model_bytes: bytes, name: str = "<bytes>") -> "TextTokenizer":
        """Tokenizer from a serialized sentencepiece model (``name`` is used in messages)."""
        tok = cls.__new__(cls)
        tok._load(model_bytes, name)
        return tok

    def _load(self, model_bytes: bytes, path: str) -> None:
        self.path = path
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.num_pieces = self.sp.get_piece_size()
        self.convention = _detect_convention(self.sp, path)
        self.bos_id, self.pad_id, self.eos_id, self.unk_id = BOS_ID, PAD_ID, EOS_ID, UNK_ID
        if self.convention == "fairseq":
            self.mask_id = self.num_pieces + 1
            self.vocab_size = self.num_pieces + 2
        else:
            mask = self.sp.piece_to_id(MASK_PIECE)
            has_mask = mask != self.sp.unk_id() and self.sp.id_to_piece(mask) == MASK_PIECE
            self.mask_id = mask if has_mask else self.num_pieces
            self.vocab_size = self.num_pieces if has_mask else self.num_pieces + 1

    @property
    def special_ids(self) -> dict[str, int]:
        return {"bos_id": self.bos_id, "pad_id": self.pad_id, "eos_id": self.eos_id,
                "unk_id": self.unk_id, "mask_id": self.mask_id}

    def encode_body(self, text: str) -> list[int]:
        """Model ids of ``text`` without ``<s>``/``</s>``."""
        return self._to_model_ids(self.sp.encode(text))

    def encode_bodies(self, texts: list[str]) -> list[list[int]]:
        """Batched :meth:`encode_body` (one sentencepiece call for the whole batch)."""
        return [self._to_model_ids(ids) for ids in self.sp.encode(list(texts), num_threads=1)]

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """``[<s>] + body + [</s>]``, the body cut to ``max_len - 2`` ids (official rule)."""
        return self.wrap(self.encode_body(text), max_len)

    def wrap(self, body: list[int], max_len: int | None = None) -> list[int]:
        if max_len is not None:
            if max_len < 3:
                raise ValueError(f"max_len must be >= 3 (room for <s>, one token, </s>), got {max_len}")
            body = body[: max_len - 2]
        return [self.bos_id, *body, self.eos_id]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special ids are skipped."""
        specials = {self.bos_id, self.pad_id, self.eos_id, self.mask_id}
        return self.sp.decode(self._to_spm_ids([i for i in ids if i not in specials]))

    def id_to_piece(self, model_id: int) -> str:
        names = {self.bos_id: "<s>", self.pad_id: "<pad>", self.eos_id: "</s>",
                 self.unk_id: "<unk>", self.mask_id: MASK_PIECE}
        if model_id in names:
            return names[model_id]
        return self.sp.id_to_piece(self._to_spm_ids([model_id])[0])

    def _to_model_ids(self, spm_ids: list[int]) -> list[int]:
        if self.convention == "native":
            return spm_ids
        # fairseq/XLM-R: shift by one; sentencepiece <unk> (0) -> 3. Control ids 1, 2
        # never come out of encode.
        return [i + 1 if i else UNK_ID for i in spm_ids]

    def _to_spm_ids(self, model_ids: list[int]) -> list[int]:
        if self.convention == "native":
            return [i for i in model_ids if i < self.num_pieces]
        return [0 if i == UNK_ID else i - 1 for i in model_ids if 3 <= i <= self.num_pieces]

    def __repr__(self) -> str:
        return (f"TextTokenizer({self.path!r}, convention={self.convention}, "
                f"vocab_size={self.vocab_size}, mask_id={self.mask_id})")


def _detect_convention(sp: spm.SentencePieceProcessor, path: str) -> str:
    ids = (sp.bos_id(), sp.pad_id(), sp.eos_id(), sp.unk_id())
    if ids == (BOS_ID, PAD_ID, EOS_ID, UNK_ID):
        return "native"
    if ids == (1, -1, 2, 0):
        return "fairseq"
    raise ValueError(
        f"{path}: unsupported sentencepiece id layout (bos, pad, eos, unk) = {ids}; "
        "supported: (0, 1, 2, 3) as trained by the text_tokenizer stage, or "
        "(1, -1, 2, 0), sentencepiece's defaults used by XLM-R / beit3.spm")
