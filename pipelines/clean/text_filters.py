"""Text cleaning steps: decode, normalise, Gopher/C4-style quality and repetition filters.

Each step is ``fn(value, cfg) -> value`` and raises :class:`Reject` to drop the
row (see :func:`pipelines.clean.rejects.run_steps`). Thresholds follow Gopher (Rae et
al. 2021, appendix A) and C4 where they suit; the defaults are relaxed where
short technical prose (the demo's stdlib docstrings) would otherwise be lost:
Gopher's 50-word minimum and 80% alphabetic-word floor drop most docstrings.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pipelines.clean.rejects import Reject, content_id
from pipelines.common.configs import check


@dataclass(frozen=True)
class TextFilterConfig:
    min_words: int = 3
    max_words: int = 100_000
    min_mean_word_length: float = 2.0
    max_mean_word_length: float = 12.0
    min_alpha_word_fraction: float = 0.5      # words with at least one letter (Gopher: 0.8)
    max_symbol_word_ratio: float = 0.1        # ('#' + '...') per word (Gopher: 0.1)
    max_bullet_line_fraction: float = 0.9     # lines starting with a bullet (Gopher: 0.9)
    max_ellipsis_line_fraction: float = 0.3   # lines ending with '...' (Gopher: 0.3)
    max_duplicate_line_fraction: float = 0.3  # repeated lines / lines (Gopher: 0.3)
    max_duplicate_line_char_fraction: float = 0.2
    # most frequent word n-gram's share of the characters, by n (Gopher: 0.20/0.18/0.16)
    max_top_ngram_fraction: dict[str, float] = field(
        default_factory=lambda: {"2": 0.20, "3": 0.18, "4": 0.16})
    # characters inside repeated word n-grams, by n (Gopher: 0.15 .. 0.10)
    max_duplicate_ngram_fraction: dict[str, float] = field(
        default_factory=lambda: {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10})
    reject_lorem_ipsum: bool = True           # C4
    near_dedup: bool = True
    near_dedup_threshold: float = 0.8         # estimated Jaccard of word shingles
    minhash_perms: int = 128
    minhash_ngram: int = 5

    def __post_init__(self):
        check(1 <= self.min_words <= self.max_words, "clean.text: need 1 <= min_words <= max_words")
        check(0 < self.min_mean_word_length < self.max_mean_word_length,
              "clean.text: need 0 < min_mean_word_length < max_mean_word_length")
        for name in ("min_alpha_word_fraction", "max_symbol_word_ratio", "max_bullet_line_fraction",
                     "max_ellipsis_line_fraction", "max_duplicate_line_fraction",
                     "max_duplicate_line_char_fraction", "near_dedup_threshold"):
            check(0.0 <= getattr(self, name) <= 1.0, f"clean.text.{name}: must be in [0, 1]")
        for name in ("max_top_ngram_fraction", "max_duplicate_ngram_fraction"):
            for n, frac in getattr(self, name).items():
                check(n.isdigit() and int(n) >= 1, f"clean.text.{name}.{n}: keys are n-gram sizes (integers)")
                check(0.0 <= frac <= 1.0, f"clean.text.{name}.{n}: must be in [0, 1]")
        check(16 <= self.minhash_perms <= 1024, "clean.text.minhash_perms: must be in [16, 1024]")
        check(1 <= self.minhash_ngram <= 32, "clean.text.minhash_ngram: must be in [1, 32]")


# ---------------------------------------------------------------- decode + normalise

def decode(value: str | bytes, cfg=None) -> str:
    """Strict UTF-8 (lone surrogates from JSON escapes count as invalid); NUL bytes reject."""
    try:
        text = value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value
        text.encode("utf-8")
    except UnicodeError as err:
        raise Reject("invalid_utf8", str(err)) from err
    if "\x00" in text:
        raise Reject("nul_bytes", f"NUL at offset {text.index(chr(0))}")
    return text


_SPACES = re.compile(r"[^\S\n\t]")            # any whitespace but newline and tab
_INNER_RUNS = re.compile(r"(?<=\S) {2,}")      # runs inside a line (indentation is kept)
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize(text: str, cfg=None) -> str:
    """NFC, control characters removed (\\n and \\t kept), whitespace normalised."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")
    text = _SPACES.sub(" ", text)
    lines = [_INNER_RUNS.sub(" ", line).rstrip() for line in text.split("\n")]
    text = _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()
    if not text:
        raise Reject("empty", "nothing left after normalisation")
    return text


def text_id(text: str) -> str:
    return content_id(b"text", text.encode("utf-8"))


# ---------------------------------------------------------------- quality (Gopher / C4)

def _word_count_within(text: str, low: int, high: int, reason: str, key: str) -> str:
    """text if low <= its word count <= high, else Reject '<reason>too_short/too_long'."""
    n = len(text.split())
    if n < low:
        raise Reject(f"{reason}too_short", f"{n} words < min_{key} {low}")
    if n > high:
        raise Reject(f"{reason}too_long", f"{n} words > max_{key} {high}")
    return text


def length(text: str, cfg: TextFilterConfig) -> str:
    return _word_count_within(text, cfg.min_words, cfg.max_words, "", "words")


def quality(text: str, cfg: TextFilterConfig) -> str:
    words = text.split()
    mean = sum(map(len, words)) / len(words)
    if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
        raise Reject("mean_word_length", f"{mean:.1f} outside [{cfg.min_mean_word_length}, {cfg.max_mean_word_length}]")
    alpha = sum(any(c.isalpha() for c in w) for w in words) / len(words)
    if alpha < cfg.min_alpha_word_fraction:
        raise Reject("few_alpha_words", f"{alpha:.2f} < {cfg.min_alpha_word_fraction}")
    symbols = (text.count("#") + text.count("...") + text.count("\u2026")) / len(words)
    if symbols > cfg.max_symbol_word_ratio:
        raise Reject("symbol_ratio", f"{symbols:.2f} > {cfg.max_symbol_word_ratio}")
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    bullets = sum(line.startswith(("\u2022", "-", "*", "\u2023", "\u25e6")) for line in lines) / len(lines)
    if len(lines) > 1 and bullets > cfg.max_bullet_line_fraction:
        raise Reject("bullet_lines", f"{bullets:.2f} > {cfg.max_bullet_line_fraction}")
    ellipsis = sum(line.endswith(("...", "\u2026")) for line in lines) / len(lines)
    if len(lines) > 1 and ellipsis > cfg.max_ellipsis_line_fraction:
        raise Reject("ellipsis_lines", f"{ellipsis:.2f} > {cfg.max_ellipsis_line_fraction}")
    if cfg.reject_lorem_ipsum and "lorem ipsum" in text.lower():
        raise Reject("lorem_ipsum", "placeholder text (C4)")
    return text


def repetition(text: str, cfg: TextFilterConfig) -> str:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    dup_lines, dup_chars = _duplicates(lines)
    if dup_lines / len(lines) > cfg.max_duplicate_line_fraction:
        raise Reject("duplicate_lines", f"{dup_lines}/{len(lines)} lines repeated")
    if dup_chars / max(1, sum(map(len, lines))) > cfg.max_duplicate_line_char_fraction:
        raise Reject("duplicate_line_chars", f"{dup_chars} characters in repeated lines")
    words = text.split()
    total = max(1, sum(map(len, words)))
    for n, limit in sorted(cfg.max_top_ngram_fraction.items(), key=lambda kv: int(kv[0])):
        frac = _top_ngram_chars(words, int(n)) / total
        if frac > limit:
            raise Reject("top_ngram", f"top {n}-gram covers {frac:.2f} > {limit}")
    for n, limit in sorted(cfg.max_duplicate_ngram_fraction.items(), key=lambda kv: int(kv[0])):
        frac = _duplicate_ngram_chars(words, int(n)) / total
        if frac > limit:
            raise Reject("duplicate_ngrams", f"repeated {n}-grams cover {frac:.2f} > {limit}")
    return text


def _duplicates(items: list[str]) -> tuple[int, int]:
    seen, count, chars = set(), 0, 0
    for item in items:
        if item in seen:
            count, chars = count + 1, chars + len(item)
        seen.add(item)
    return count, chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    if len(words) < n:
        return 0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = counts.most_common(1)[0]
    return sum(map(len, gram)) * count if count > 1 else 0


def _duplicate_ngram_chars(words: list[str], n: int) -> int:
    """Characters of words inside n-grams seen before (non-overlapping, as in Gopher/datatrove)."""
    seen, chars, i = set(), 0, 0
    while i + n <= len(words):
        gram = tuple(words[i:i + n])
        if gram in seen:
            chars += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


TEXT_STEPS = (("decode", decode), ("normalise", normalize), ("length", length),
              ("quality", quality), ("repetition", repetition))


# ---------------------------------------------------------------- captions

@dataclass(frozen=True)
class PairFilterConfig:
    """Caption rules and pair-level near-dedup (pair images follow ``clean.image``)."""
    min_caption_words: int = 2
    max_caption_words: int = 256
    # Drop a pair whose normalised caption is identical to a kept one's and whose image is
    # within clean.image.phash_max_distance of it. Exact pair duplicates are always dropped.
    near_dedup: bool = True

    def __post_init__(self):
        check(1 <= self.min_caption_words <= self.max_caption_words,
              "clean.pair: need 1 <= min_caption_words <= max_caption_words")


def normalize_caption(text: str, cfg=None) -> str:
    """A caption is one line: normalise, then join all whitespace to single spaces."""
    try:
        return " ".join(normalize(text).split())
    except Reject as rej:
        raise Reject("empty_caption", rej.detail) from None


def caption_length(text: str, cfg: PairFilterConfig) -> str:
    return _word_count_within(text, cfg.min_caption_words, cfg.max_caption_words, "caption_", "caption_words")


def caption_id(text: str) -> str:
    return content_id(b"caption", text.encode("utf-8"))


CAPTION_STEPS = (("caption_decode", decode), ("caption_normalise", normalize_caption),
                 ("caption_length", caption_length))


# ---------------------------------------------------------------- near-dedup signature

# Fixed, so signatures (and the near-dedup decisions) never change between runs or versions.
MINHASH_SEED = 1
MINHASH_SCHEME = "affine32"

def minhash(text: str, num_perm: int, ngram: int) -> np.ndarray:
    """MinHash signature (num_perm,) uint64 of the lower-cased word n-gram shingles."""
    from datasketch import MinHash

    words = text.lower().split()
    shingles = {" ".join(words[i:i + ngram]) for i in range(max(1, len(words) - ngram + 1))}
    sig = MinHash(num_perm=num_perm, seed=MINHASH_SEED, scheme=MINHASH_SCHEME)
    sig.update_batch([s.encode("utf-8") for s in sorted(shingles)])
    return sig.hashvalues.astype(np.uint64)


__all__ = ["TextFilterConfig", "PairFilterConfig", "TEXT_STEPS", "CAPTION_STEPS", "decode",
           "normalize", "normalize_caption", "text_id", "caption_id", "minhash", "MINHASH_SEED", "MINHASH_SCHEME"]
