"""Seeds derived from integer keys, so every random draw is a pure function of
(seed, step, position, ...) and never of worker count or interruption."""
from __future__ import annotations

import hashlib

import numpy as np


def seeded_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def mix_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)


def text_key(text: str) -> int:
    """A string (e.g. a sample id) as a 64-bit integer key for :func:`seeded_rng` / :func:`mix_seed`."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
