"""Seeds derived from integer keys, so every random draw is a pure function of
(seed, step, position, ...) and never of worker count or interruption."""
from __future__ import annotations

import numpy as np


def seeded_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def mix_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
