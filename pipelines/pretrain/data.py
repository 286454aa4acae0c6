"""Deterministic, exactly resumable sample order over the packed shards.

Why not Ray Data's ``get_dataset_shard``: its iterators are dynamically load
balanced across workers and cannot start mid-epoch, so after a resume a run
would either repeat or skip samples, and two workers would not see the samples
one worker sees. Here the order is a pure function of (seed, modality, epoch,
shard list), computed identically by every worker without communication:

- each modality is its own endless stream over the rows of that modality;
- epoch ``e`` of a stream visits the shards in a permutation drawn from
  (seed, modality, e) and, inside each shard, its rows of that modality in a
  permutation drawn from (seed, modality, e, shard index): a shard-blocked
  shuffle that only ever needs one or two shards in memory, over shards that
  ``pack`` already shuffled globally;
- step ``t`` takes stream positions ``[t*B, (t+1)*B)`` (B = the modality's
  global batch, epochs follow each other without gaps) and worker ``r`` of
  ``W`` takes the r-th contiguous slice of B/W of them;
- with K > 1 views per image (``tokenize.views_per_image``), an image or pair sample
  trains in epoch ``e`` on view :func:`view_index` (seed, id, e) of its row.

So the state of the data after ``t`` steps is ``t`` itself: a resume from a
checkpoint at step ``t`` continues at the exact next sample, and 1 worker and
2 workers see the same samples in every global batch.
"""
from __future__ import annotations

import bisect
import dataclasses

import numpy as np
import torch

from model.batch import MixedBatch, TextPart
from model.masking import TextMask, block_mask, num_to_mask, token_grid
from model.task import PretrainMasks
from pipelines.common.schema import MODALITIES, VIEW_COLUMNS
from pipelines.common.seeding import mix_seed, seeded_rng, text_key
from pipelines.common.shards import ShardIndex, ShardRowReader

VIEW_SALT = 0x56494557  # "VIEW": keeps the view draws apart from the other draws of the seed


def view_index(seed: int, sample_id: str, epoch: int, views: int) -> int:
    """The view (0..views-1) a sample trains on in ``epoch``: a pure function of (seed, id,
    epoch), uniform over the views; 0 (the centre crop) whenever there is one view."""
    if views == 1:
        return 0
    return mix_seed(seed, VIEW_SALT, text_key(sample_id), epoch) % views


def pick_view(row: dict, view: int, views: int) -> dict:
    """A copy of an image or pair row whose ``image`` / ``visual_tokens`` are view ``view``
    (schema.VIEW_LAYOUT: 0 the row's own, v > 0 item v - 1 of the view columns, then dropped)."""
    images, tokens = row["aug_images"], row["aug_visual_tokens"]
    if images is None or tokens is None or len(images) != views - 1 or len(tokens) != views - 1:
        raise ValueError(f"row {row['id']!r}: {len(images or [])} augmented views, "
                         f"the manifest says views_per_image = {views}")
    out = {k: v for k, v in row.items() if k not in VIEW_COLUMNS}
    return out if view == 0 else out | {"image": images[view - 1], "visual_tokens": tokens[view - 1]}


class ModalityOrder:
    """Endless, deterministic order of one modality's rows: position -> (shard, row)."""

    def __init__(self, index: ShardIndex, modality: str, seed: int):
        self.index = index
        self.modality_id = MODALITIES.index(modality)
        self.seed = seed
        self.counts = index.counts[modality]
        self.size = sum(self.counts)
        if self.size == 0:
            raise ValueError(f"no {modality} rows in the {len(index.paths)} shard(s) to train on")
        self._epoch = None
        self._rows: dict[int, np.ndarray] = {}

    def _epoch_layout(self, epoch: int):
        """(shard order, cumulative row counts along it) of one epoch, memoised."""
        if self._epoch is None or self._epoch[0] != epoch:
            shards = [s for s in seeded_rng(self.seed, self.modality_id, epoch).permutation(len(self.counts))
                      if self.counts[s] > 0]
            cumulative = np.cumsum([self.counts[s] for s in shards]).tolist()
            self._epoch = (epoch, shards, cumulative)
            self._rows = {}
        return self._epoch[1], self._epoch[2]

    def _row_order(self, epoch: int, shard: int) -> np.ndarray:
        if shard not in self._rows:
            self._rows[shard] = seeded_rng(self.seed, self.modality_id, epoch, shard + 1).permutation(self.counts[shard])
        return self._rows[shard]

    def locate(self, position: int) -> tuple[int, int, int]:
        """Stream position -> (epoch, shard index, row among the shard's rows of this modality)."""
        epoch, offset = divmod(position, self.size)
        shards, cumulative = self._epoch_layout(epoch)
        slot = bisect.bisect_right(cumulative, offset)
        start = cumulative[slot - 1] if slot else 0
        shard = int(shards[slot])
        return epoch, shard, int(self._row_order(epoch, shard)[offset - start])


def worker_positions(step: int, global_batch: int, rank: int, world_size: int) -> range:
    """The stream positions worker ``rank`` consumes at ``step`` (a contiguous slice)."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by {world_size} workers")
    local = global_batch // world_size
    start = step * global_batch + rank * local
    return range(start, start + local)


class MixedStream:
    """Per-step rows for one worker: ``batch[m]`` / world_size rows of each modality m."""

    def __init__(self, index: ShardIndex, batch: dict[str, int], seed: int, rank: int, world_size: int):
        self.batch = {m: n for m, n in batch.items() if n > 0}
        self.rank, self.world_size = rank, world_size
        self.seed, self.views = seed, index.views_per_image
        self.orders = {m: ModalityOrder(index, m, seed) for m in self.batch}
        self.readers = {m: ShardRowReader(index, m, views=m != "text") for m in self.batch}

    def rows(self, step: int) -> list[dict]:
        """The rows this worker trains on at ``step``, modality by modality (K > 1: each image
        and pair row as the view its epoch picks)."""
        out = []
        for m, global_batch in self.batch.items():
            for position in worker_positions(step, global_batch, self.rank, self.world_size):
                epoch, shard, row = self.orders[m].locate(position)
                sample = self.readers[m].rows_of(shard)[row]
                if self.views > 1 and m != "text":
                    sample = pick_view(sample, view_index(self.seed, sample["id"], epoch, self.views), self.views)
                out.append(sample)
        return out

    def positions(self, step: int) -> dict[str, range]:
        """This worker's stream positions of each modality at ``step`` (rows() order)."""
        return {m: worker_positions(step, b, self.rank, self.world_size) for m, b in self.batch.items()}

    def epochs(self, step: int) -> dict[str, float]:
        """Fractional epochs of each modality completed after ``step`` steps."""
        return {m: step * b / self.orders[m].size for m, b in self.batch.items()}


# ----------------------------------------------------------------------------- masks per sample

def step_masks(masker, batch: MixedBatch, step: int, seed: int, positions: dict[str, range],
               global_batch: dict[str, int]) -> PretrainMasks:
    """This worker's masks at ``step``, identical for any number of workers.

    Text: drawn sample by sample from a seed of the sample's stream position (cheap, and
    independent of the padding the other samples of the batch bring). Images: the
    block-wise masks depend on nothing but the grid, so every worker draws the whole global
    batch's masks in one batched call (seeded by step and modality) and keeps its slice.
    """
    cfg, out = masker.masking, {}

    def text_masks(part, ratio, modality):
        gens = [torch.Generator().manual_seed(mix_seed(seed, MODALITIES.index(modality), p))
                for p in positions[modality]]
        # per-sample generators draw over each row's real tokens only: padding-independent
        return masker.text(part.ids, part.padding_mask, ratio, gens)

    def image_masks(part, ratio, modality, key):
        n = part.visual_tokens.shape[1]
        gen = torch.Generator().manual_seed(mix_seed(seed, step, MODALITIES.index(modality), key))
        masks = block_mask(global_batch[modality], token_grid(n), num_to_mask(ratio, n), cfg.min_block, generator=gen)
        first = positions[modality].start - step * global_batch[modality]
        return masks[first:first + part.batch_size]

    if batch.text is not None:
        out["text"] = text_masks(batch.text, cfg.text_ratio, "text")
    if batch.image is not None:
        out["image"] = image_masks(batch.image, cfg.image_ratio, "image", 0)
    if batch.pair is not None:
        out["pair_text"] = text_masks(batch.pair, cfg.caption_ratio, "pair")
        if cfg.pair_image_ratio > 0:
            out["pair_image"] = image_masks(batch.pair, cfg.pair_image_ratio, "pair", 1)
    return PretrainMasks(**out)


def part_counts(masks: PretrainMasks) -> dict[str, int]:
    """Masked positions of each part key (model.task.PART_KEYS) the masks select."""
    def total(x) -> int:
        return int(x.sum()) if x is not None else 0
    return {"text_mlm": total(masks.text.selected if masks.text else None), "image_mim": total(masks.image),
            "pair_mlm": total(masks.pair_text.selected if masks.pair_text else None),
            "pair_mim": total(masks.pair_image)}


def split_micro_batches(batch: MixedBatch, masks: PretrainMasks, k: int) -> list[tuple[MixedBatch, PretrainMasks]]:
    """The step's batch as ``k`` micro-batches: micro-batch j holds the j-th contiguous slice
    of every part's rows, with the slices of its masks (drawn for the whole batch, so the
    masks and the data order do not depend on k)."""
    if k == 1:
        return [(batch, masks)]
    names = [n for n in ("text", "image", "pair") if getattr(batch, n) is not None]
    slices = {n: torch.tensor_split(torch.arange(getattr(batch, n).batch_size), k) for n in names}
    out = []
    for j in range(k):
        parts = {n: _rows(getattr(batch, n), slices[n][j]) for n in names if len(slices[n][j])}
        if not parts:
            continue
        keep = lambda mask, n: _rows(mask, slices[n][j]) if n in parts and mask is not None else None  # noqa: E731
        out.append((MixedBatch(**parts), PretrainMasks(text=keep(masks.text, "text"), image=keep(masks.image, "image"),
                                                       pair_text=keep(masks.pair_text, "pair"),
                                                       pair_image=keep(masks.pair_image, "pair"))))
    return out


def _rows(value, rows: torch.Tensor):
    """The given rows of a part (TextPart, ImagePart, PairPart), a TextMask or a mask tensor."""
    if isinstance(value, torch.Tensor):
        return value[rows]
    return type(value)(**{f.name: getattr(value, f.name)[rows] for f in dataclasses.fields(value)})


def split_text_part(batch: MixedBatch, masks: PretrainMasks, chunks: int) -> list[tuple[MixedBatch, PretrainMasks]]:
    """[(text chunk, its masks)..., (image + pair parts, their masks)]: the text part cut into
    ``chunks`` length-sorted pieces, each padded to its own longest text. Texts vary a lot in
    length, so one block padded to the longest would spend most of its positions on padding."""
    rest = {name: getattr(batch, name) for name in ("image", "pair") if getattr(batch, name) is not None}
    rest_masks = PretrainMasks(image=masks.image, pair_text=masks.pair_text, pair_image=masks.pair_image)
    pieces = [(MixedBatch(**rest), rest_masks)] if rest else []
    if batch.text is None:
        return pieces
    lengths = (~batch.text.padding_mask).sum(1)
    order = torch.argsort(lengths, stable=True)
    for group in torch.tensor_split(order, min(max(1, chunks), len(order))):
        n = int(lengths[group].max())
        text = TextPart(batch.text.ids[group, :n], batch.text.padding_mask[group, :n])
        mask = TextMask(masks.text.input_ids[group, :n], masks.text.selected[group, :n])
        pieces.append((MixedBatch(text=text), PretrainMasks(text=mask)))
    return pieces


def count_tokens(batch: MixedBatch) -> int:
    """Sequence positions the backbone processes (padding excluded)."""
    total = 0
    for name, part in batch.parts.items():
        if name != "text":
            total += part.batch_size * (1 + part.visual_tokens.shape[1])
        if name != "image":
            total += int((~part.padding_mask).sum())
    return total


__all__ = ["view_index", "pick_view", "ModalityOrder", "worker_positions", "MixedStream", "step_masks", "part_counts",
           "split_micro_batches", "split_text_part", "count_tokens"]
