"""Text masking (BERT 80/10/10) and BEiT block-wise image masking."""
from __future__ import annotations

import pytest
import torch

from model.masking import block_mask, mask_text, num_to_mask, replacement_ids

torch.set_num_threads(1)

GRIDS = [((14, 14), 0.4), ((6, 6), 0.4), ((10, 7), 0.5), ((8, 8), 0.75), ((5, 9), 0.2)]


def components(mask: torch.Tensor) -> list[int]:
    """Sizes of the 4-connected components of a (H, W) bool mask (plain flood fill)."""
    height, width = mask.shape
    cells = {(r, c) for r in range(height) for c in range(width) if mask[r, c]}
    sizes = []
    while cells:
        stack, size = [cells.pop()], 0
        while stack:
            r, c = stack.pop()
            size += 1
            for nb in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if nb in cells:
                    cells.remove(nb)
                    stack.append(nb)
        sizes.append(size)
    return sizes


def bounding_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W) bool -> heights (B,), widths (B,) of each mask's bounding box."""
    def span(any_along: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(any_along.shape[1]).expand_as(any_along)
        last = idx.masked_fill(~any_along, -1).max(1).values
        first = idx.masked_fill(~any_along, any_along.shape[1]).min(1).values
        return last - first + 1
    return span(masks.any(2)), span(masks.any(1))


@pytest.mark.parametrize("grid,ratio", GRIDS)
def test_block_mask_has_exact_count(grid, ratio):
    n = num_to_mask(ratio, grid[0] * grid[1])
    masks = block_mask(64, grid, n, generator=0)
    assert masks.shape == (64, grid[0] * grid[1]) and masks.dtype == torch.bool
    assert masks.sum(1).tolist() == [n] * 64


def test_default_counts():
    assert num_to_mask(0.4, 14 * 14) == 78
    assert num_to_mask(0.4, 6 * 6) == 14


@pytest.mark.parametrize("grid,ratio", GRIDS)
def test_every_connected_component_is_at_least_a_min_block(grid, ratio):
    n = num_to_mask(ratio, grid[0] * grid[1])
    masks = block_mask(40, grid, n, min_block=16, generator=1).view(40, *grid)
    smallest = min(16, n)  # a 6x6 grid at 40% has 14 patches to mask: one component of 14
    for mask in masks:
        sizes = components(mask)
        assert sum(sizes) == n
        assert min(sizes) >= smallest, sizes


def test_blocks_are_rectangles_with_both_orientations():
    # 20 patches on 14x14: one block of area uniform in [16, 20], topped up through overlap.
    n = 20
    masks = block_mask(400, (14, 14), n, generator=2).view(400, 14, 14)
    heights, widths = bounding_boxes(masks)
    exact = heights * widths == n
    assert exact.float().mean() > 0.3  # placed as one rectangle outright
    # log-uniform aspect in [0.3, 1/0.3] is symmetric: tall and wide blocks equally often
    tall = (heights > widths)[exact].float().mean()
    assert 0.3 < tall < 0.7
    # and compact: the bounding box is on average barely larger than the mask (a uniformly
    # random 20 of 196 patches would fill about 10% of its box)
    assert (n / (heights * widths).float()).mean() > 0.85


def test_default_masks_are_block_like_not_scattered():
    n = 78
    block = block_mask(100, (14, 14), n, generator=3).view(100, 14, 14)
    scattered = torch.rand(100, 196, generator=torch.Generator().manual_seed(3)).argsort(1) < n
    scattered = scattered.view(100, 14, 14)

    def adjacent_pairs(m):
        return ((m[:, 1:] & m[:, :-1]).sum() + (m[:, :, 1:] & m[:, :, :-1]).sum()).item()
    # measured: ~1.7 shared edges per masked patch in blocks vs ~0.74 when scattered
    assert adjacent_pairs(block) > 2.0 * adjacent_pairs(scattered)


def test_block_mask_is_deterministic_under_a_seed():
    a = block_mask(16, (14, 14), 78, generator=7)
    b = block_mask(16, (14, 14), 78, generator=torch.Generator().manual_seed(7))
    c = block_mask(16, (14, 14), 78, generator=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 16  # images of a batch differ


def seeded(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_per_sample_generators_make_each_image_independent_of_its_batch():
    seeds = [11, 12, 13, 14, 15]
    together = block_mask(5, (14, 14), 78, generator=seeded(*seeds))
    alone = torch.cat([block_mask(1, (14, 14), 78, generator=seeded(s)) for s in seeds])
    assert torch.equal(together, alone)
    shuffled = block_mask(3, (14, 14), 78, generator=seeded(14, 11, 99))
    assert torch.equal(shuffled[0], together[3]) and torch.equal(shuffled[1], together[0])
    with pytest.raises(ValueError, match="2 per-sample generators for a batch of 3"):
        block_mask(3, (14, 14), 78, generator=seeded(1, 2))


def test_block_mask_edge_cases_and_errors():
    assert not block_mask(3, (6, 6), 0).any()
    assert block_mask(3, (6, 6), 36, generator=0).all()
    assert block_mask(0, (6, 6), 14).shape == (0, 36)
    with pytest.raises(ValueError, match="cannot mask"):
        block_mask(1, (6, 6), 37)
    with pytest.raises(ValueError, match="min_block"):
        block_mask(1, (6, 6), 10, min_block=0)


# ----------------------------------------------------------------------------- text

SPECIALS = [0, 1, 2, 3]
MASK_ID = 4
VOCAB = 1000


def text_batch(batch=200, length=64, seed=0):
    """<s> words </s> <pad>...: random lengths, some with specials inside."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, length), generator=g)
    lengths = torch.randint(3, length + 1, (batch,), generator=g)
    padding = torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)
    ids[:, 0] = 0
    ids[torch.arange(batch), lengths - 1] = 2
    ids[:, 5] = torch.where(lengths > 6, 3, ids[:, 5])  # an <unk> inside most rows
    ids = ids.masked_fill(padding, 1)
    maskable = ~padding & ~torch.isin(ids, torch.tensor(SPECIALS))
    return ids, padding, maskable


def run_mask_text(ids, maskable, ratio=0.15, generator=0):
    return mask_text(ids, maskable, ratio, MASK_ID, replacement_ids(VOCAB, SPECIALS + [MASK_ID]), generator)


@pytest.mark.parametrize("ratio", [0.15, 0.5])
def test_text_mask_counts_are_exact_per_row(ratio):
    ids, _, maskable = text_batch()
    out = run_mask_text(ids, maskable, ratio)
    n = maskable.sum(1)
    expected = torch.clamp(torch.floor(n * ratio + 0.5), min=1).long()
    assert torch.equal(out.selected.sum(1), expected)


def test_specials_and_padding_are_never_selected_nor_changed():
    ids, padding, maskable = text_batch()
    for seed in range(5):
        out = run_mask_text(ids, maskable, 0.5, generator=seed)
        assert not (out.selected & ~maskable).any()
        assert torch.equal(out.input_ids[~out.selected], ids[~out.selected])
        assert not (out.selected & padding).any()


def test_rows_without_maskable_tokens_select_nothing():
    ids = torch.tensor([[0, 2, 1, 1], [0, 7, 8, 2]])
    maskable = torch.tensor([[False] * 4, [False, True, True, False]])
    out = run_mask_text(ids, maskable, 0.15)
    assert out.selected.sum(1).tolist() == [0, 1]


def test_bert_80_10_10_proportions():
    ids, _, maskable = text_batch(batch=400, length=64)
    out = run_mask_text(ids, maskable, 0.5, generator=11)
    chosen_in, chosen_orig = out.input_ids[out.selected], ids[out.selected]
    total = chosen_in.numel()
    assert total > 5000
    masked = (chosen_in == MASK_ID).float().mean().item()
    randomised = (chosen_in != chosen_orig).logical_and(chosen_in != MASK_ID).float().mean().item()
    kept = (chosen_in == chosen_orig).float().mean().item()
    # binomial std at n > 5000 is < 0.006; allow 4 sigma
    assert abs(masked - 0.8) < 0.025 and abs(randomised - 0.1) < 0.02 and abs(kept - 0.1) < 0.02
    replaced = chosen_in[(chosen_in != chosen_orig) & (chosen_in != MASK_ID)]
    assert not torch.isin(replaced, torch.tensor(SPECIALS + [MASK_ID])).any()
    assert replaced.unique().numel() > 100  # spread over the vocabulary


def test_text_mask_is_deterministic_under_a_seed():
    ids, _, maskable = text_batch(batch=32)
    a, b, c = (run_mask_text(ids, maskable, generator=s) for s in (5, 5, 6))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.selected, b.selected)
    assert not torch.equal(a.selected, c.selected)


def test_per_sample_text_generators_ignore_padding_length_and_neighbours():
    ids, padding, maskable = text_batch(batch=6, length=20, seed=4)
    pool = replacement_ids(VOCAB, SPECIALS + [MASK_ID])

    def run(ids, padding, maskable, seeds):
        return mask_text(ids, maskable, 0.5, MASK_ID, pool, seeded(*seeds), padding_mask=padding)
    together = run(ids, padding, maskable, range(6))
    extra = 7  # the same rows padded further, as in a batch with a longer neighbour
    def pad(x, value):
        return torch.nn.functional.pad(x, (0, extra), value=value)
    wider = run(pad(ids, 1), pad(padding, True), pad(maskable, False), range(6))
    assert torch.equal(wider.input_ids[:, :20], together.input_ids)
    assert torch.equal(wider.selected[:, :20], together.selected)
    for i in range(6):
        n = int((~padding[i]).sum())
        alone = run(ids[i:i + 1, :n], padding[i:i + 1, :n], maskable[i:i + 1, :n], [i])
        assert torch.equal(alone.input_ids[0], together.input_ids[i, :n])
        assert torch.equal(alone.selected[0], together.selected[i, :n])


def test_text_mask_errors():
    ids, _, maskable = text_batch(batch=2)
    with pytest.raises(ValueError, match="ratio"):
        run_mask_text(ids, maskable, 0.0)
    with pytest.raises(ValueError, match="differ"):
        run_mask_text(ids, maskable[:, :3])
