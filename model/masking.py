"""Masking for masked data modeling: BERT-style text masking and BEiT block-wise image masking.

Both work on whole batches with tensor ops (no Python loop over samples or tokens). Their
random numbers come from one torch.Generator (or an int seed), so a seed fixes the result; or
from a list of per-sample generators, one per row, which makes each sample's mask a function of
its own generator alone, independent of the other samples of the batch and of the padded length
(the same masks as masking each sample on its own with its generator, in one call). Random
numbers are drawn on the generator's device and moved to the data's device, so a CPU generator
can drive masking of CUDA tensors.

Image masking follows BEiT's MaskingGenerator (unilm/beit/masking_generator.py): rectangles
with area uniform in [min_block, remaining] and log-uniform aspect ratio in
[min_aspect, 1/min_aspect], up to max_tries placements per block, never exceeding the target.
Differences, each to make a guarantee hold:
- exact count: BEiT stops short when 10 tries fail; we then grow the mask one 4-neighbour
  patch at a time, most-enclosed first (or from a random seed patch when no block fits, as
  on a 6x6 grid at 40%, where 14 < 16 patches leave no room for a full block).
- contiguity: a rectangle is accepted only if it has at least min(min_block, target) patches
  or overlaps the existing mask, so every connected component of the final mask has at least
  min(min_block, target) patches (BEiT's rounding and tail blocks can leave 1-patch islands).
- a block may span the whole grid side (BEiT requires h < height, w < width), which matters
  on small grids such as 6x6.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Generator = torch.Generator | int | None | Sequence[torch.Generator | int]


def as_generator(generator: Generator) -> torch.Generator | list[torch.Generator] | None:
    """A torch.Generator from a generator or an int seed; None (the global RNG) stays None; a
    sequence becomes a list of per-row generators."""
    if isinstance(generator, int):
        return torch.Generator().manual_seed(generator)
    if isinstance(generator, Sequence):
        return [as_generator(g) for g in generator]
    return generator


def _check_rows(generator, batch: int) -> None:
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"{len(generator)} per-sample generators for a batch of {batch}")


def _rand(shape: tuple[int, ...], generator, device=None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform [0, 1) float32 of `shape`, drawn on the generator's device, returned on `device`.

    With a list of per-row generators, row r (of shape[1:]) comes from generator[rows[r]]
    (rows defaults to 0..shape[0]-1), so a row's numbers never depend on the other rows."""
    if isinstance(generator, list):
        picked = generator if rows is None else [generator[i] for i in rows.tolist()]
        if not picked:
            return torch.empty(shape, device=device)
        return torch.stack([torch.rand(shape[1:], generator=g, device=g.device) for g in picked]).to(device)
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def num_to_mask(ratio: float, total: int) -> int:
    """round(ratio * total), half up; e.g. 0.4 of 196 -> 78, 0.4 of 36 -> 14."""
    return int(math.floor(ratio * total + 0.5))


# ----------------------------------------------------------------------------- text

@dataclass(frozen=True)
class TextMask:
    input_ids: torch.Tensor  # (B, L) int64, ids after the 80/10/10 replacement
    selected: torch.Tensor   # (B, L) bool, positions to predict (targets = original ids there)


def replacement_ids(vocab_size: int, exclude: torch.Tensor | list[int]) -> torch.Tensor:
    """Ids eligible as BERT's random replacement: the vocabulary minus specials and [MASK]."""
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[torch.as_tensor(exclude, dtype=torch.long)] = False
    return keep.nonzero().squeeze(1)  # (V',)


def mask_text(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    ratio: float,
    mask_id: int,
    random_ids: torch.Tensor,
    generator: Generator = None,
    probs: tuple[float, float, float] = (0.8, 0.1, 0.1),
    padding_mask: torch.Tensor | None = None,
) -> TextMask:
    """Select round(ratio * n_i) of the n_i maskable tokens of each row (at least one when
    n_i > 0), then replace 80% of the selected by mask_id, 10% by a random id from random_ids
    and keep 10% (BERT).

    ids (B, L) int64; maskable (B, L) bool (False for specials and padding, which are thus
    never selected); random_ids (V',) int64 replacement candidates; padding_mask (B, L) bool,
    True = padding: with per-sample generators, a row draws 3 numbers per non-padding
    position only, so its mask does not depend on how far the batch padded it.
    """
    if ids.shape != maskable.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and maskable {tuple(maskable.shape)} differ")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"text mask ratio must be in (0, 1], got {ratio}")
    if abs(sum(probs) - 1.0) > 1e-6 or min(probs) < 0:
        raise ValueError(f"probs (mask, random, keep) must be >= 0 and sum to 1, got {probs}")
    gen = as_generator(generator)
    batch, length = ids.shape
    _check_rows(gen, batch)
    draws = _text_draws(gen, batch, length, padding_mask, ids.device)  # (B, L, 3)
    n = maskable.sum(1)                                             # (B,)
    k = torch.where(n > 0, torch.floor(n * ratio + 0.5).long().clamp(min=1), n)  # (B,)
    # Random ranks among maskable tokens: non-maskable get score 2 > any uniform, so they sort
    # last and the first k of each row are a uniform k-subset of its maskable tokens.
    scores = draws[..., 0].masked_fill(~maskable, 2.0)
    order = scores.argsort(dim=1)                                   # (B, L)
    first_k = torch.arange(length, device=ids.device).unsqueeze(0) < k.unsqueeze(1)
    selected = torch.zeros_like(maskable).scatter(1, order, first_k)

    u = draws[..., 1]
    to_mask = selected & (u < probs[0])
    to_random = selected & (u >= probs[0]) & (u < probs[0] + probs[1])
    pick = (draws[..., 2] * random_ids.numel()).long().clamp(max=random_ids.numel() - 1)
    random_tokens = random_ids.to(ids.device)[pick]                 # (B, L)
    input_ids = torch.where(to_random, random_tokens, ids).masked_fill(to_mask, mask_id)
    return TextMask(input_ids=input_ids, selected=selected)


def _text_draws(gen, batch: int, length: int, padding_mask, device) -> torch.Tensor:
    """(B, L, 3) uniforms: selection score, replacement kind, replacement id per position.
    Position-major, so a row's first n positions get the same numbers whatever L is."""
    if not isinstance(gen, list):
        return _rand((batch, length, 3), gen, device)
    valid = torch.ones(batch, length, dtype=torch.bool) if padding_mask is None else ~padding_mask.cpu()
    draws = torch.zeros(batch, length, 3)
    per_row = [torch.rand((n, 3), generator=g) for n, g in zip(valid.sum(1).tolist(), gen)]
    if per_row:
        draws[valid] = torch.cat(per_row)  # row-major, so row i's numbers land on its own tokens
    return draws.to(device)


# ----------------------------------------------------------------------------- images

def _place_blocks(mask, target, min_block, max_block, log_aspect, max_tries, gen):
    """Place rectangles in every image of mask (B, H, W) bool, in place, until each image has
    `target` patches or max_tries placements of its next block fail. Returns counts (B,).

    One round places one block in each image still going (`todo`); its max_tries candidate
    placements are drawn together and the first acceptable one wins, the same law as BEiT's
    sequential tries since a rejected try leaves the mask unchanged."""
    batch, height, width = mask.shape
    eff_min = min(min_block, target)
    rows, cols = torch.arange(height), torch.arange(width)
    count = torch.zeros(batch, dtype=torch.long)
    todo = torch.arange(batch)
    while todo.numel():
        sub = mask[todo]                                                             # (A, H, W)
        max_new = (target - count[todo]).clamp(max=max_block).unsqueeze(1)          # (A, 1)
        u = _rand((todo.numel(), 4, max_tries), gen, rows=todo)                      # (A, 4, T)
        area = min_block + (max_new - min_block) * u[:, 0]
        aspect = torch.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u[:, 1])
        h = torch.round(torch.sqrt(area * aspect)).long()
        w = torch.round(torch.sqrt(area / aspect)).long()
        fits = (h >= 1) & (w >= 1) & (h <= height) & (w <= width)
        h, w = h.clamp(1, height), w.clamp(1, width)
        top = (u[:, 2] * (height - h + 1)).long()
        left = (u[:, 3] * (width - w + 1)).long()
        # masked patches already inside each candidate, from a summed-area table (A, H+1, W+1)
        sat = F.pad(sub.long().cumsum(1).cumsum(2), (1, 0, 1, 0)).flatten(1)

        def corner(r, c):
            return sat.gather(1, r * (width + 1) + c)

        overlap = corner(top + h, left + w) - corner(top, left + w) - corner(top + h, left) + corner(top, left)
        new = h * w - overlap
        ok = fits & (new > 0) & (new <= max_new) & ((h * w >= eff_min) | (overlap > 0))  # (A, T)
        placed = ok.any(1)                                                           # (A,)
        first = ok.long().argmax(1, keepdim=True)                                    # (A, 1)
        t, l, hh, ww = (x.gather(1, first) for x in (top, left, h, w))               # (A, 1) each
        in_rows = (rows >= t) & (rows < t + hh) & placed.unsqueeze(1)                # (A, H)
        in_cols = (cols >= l) & (cols < l + ww)                                      # (A, W)
        mask[todo] = sub | (in_rows.unsqueeze(2) & in_cols.unsqueeze(1))
        count[todo] += torch.where(placed, new.gather(1, first).squeeze(1), 0)
        todo = todo[placed & (count[todo] < target)]
    return count


def _grow(mask: torch.Tensor, need: torch.Tensor, gen) -> None:
    """Add need (B,) patches per image to mask (B, H, W), one at a time, each a 4-neighbour of
    the current mask (any patch when the mask is empty), so components stay connected. Among
    the candidates, those with more masked neighbours win (ties at random): growth fills
    notches first and stays compact, i.e. block-like."""
    todo = (need > 0).nonzero().squeeze(1)
    if not todo.numel():
        return
    sub, need = mask[todo], need[todo]                                               # (A, H, W), (A,)
    for step in range(int(need.max())):
        growing = need > step                                                        # (A,)
        m = sub.to(torch.uint8)
        neighbours = torch.zeros_like(m)
        neighbours[:, 1:] += m[:, :-1]
        neighbours[:, :-1] += m[:, 1:]
        neighbours[:, :, 1:] += m[:, :, :-1]
        neighbours[:, :, :-1] += m[:, :, 1:]
        empty = ~sub.flatten(1).any(1).view(-1, 1, 1)
        frontier = ((neighbours > 0) | empty) & ~sub
        noise = torch.zeros(sub.shape)
        noise[growing] = _rand((int(growing.sum()), *sub.shape[1:]), gen, rows=todo[growing])
        score = (neighbours.float() + noise).masked_fill(~frontier, -1.0).flatten(1)
        pick = score.argmax(1, keepdim=True)                                         # (A, 1)
        add = torch.zeros_like(score, dtype=torch.bool).scatter(1, pick, growing.unsqueeze(1))
        sub |= add.view_as(sub)
    mask[todo] = sub


def token_grid(num_tokens: int) -> tuple[int, int]:
    """The (H, W) patch grid of ``num_tokens`` visual codes: square, row-major (VQ-KD's
    codes of a square crop). The model's own grid must equal it; its pixels need not."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} visual tokens do not form a square patch grid")
    return side, side


def block_mask(
    batch_size: int,
    grid: tuple[int, int],
    num_masked: int,
    min_block: int = 16,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    max_tries: int = 10,
    generator: Generator = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """BEiT block-wise masks -> (B, H*W) bool, row-major like the visual tokens, with exactly
    num_masked True per row. Every connected component has >= min(min_block, num_masked)
    patches. Computed on the CPU (a 14x14 grid is tiny) and moved to `device`. generator: one
    generator / seed / None for the batch, or a list of B per-sample generators."""
    height, width = grid
    if not 0 <= num_masked <= height * width:
        raise ValueError(f"cannot mask {num_masked} of {height}x{width} patches")
    if min_block < 1 or not 0.0 < min_aspect <= 1.0 or max_tries < 1:
        raise ValueError(f"bad block parameters min_block={min_block} min_aspect={min_aspect} max_tries={max_tries}")
    gen = as_generator(generator)
    _check_rows(gen, batch_size)
    if any(g.device.type != "cpu" for g in (gen if isinstance(gen, list) else [gen] if gen else [])):
        raise ValueError("block_mask draws on the CPU; pass CPU generators")
    mask = torch.zeros(batch_size, height, width, dtype=torch.bool)
    if num_masked and batch_size:
        log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
        count = _place_blocks(mask, num_masked, min_block, max_block or num_masked, log_aspect, max_tries, gen)
        _grow(mask, num_masked - count, gen)
    return mask.flatten(1).to(device)
