"""Mixed-modality batches for masked data modeling, and the collate step from shard rows.

A MixedBatch holds any subset of three parts (DESIGN §3, §5):
    text   plain text                       -> masked language modeling
    image  images + their visual tokens     -> masked image modeling
    pair   image-text pairs                 -> MLM on the caption, MIM on the image
Each part is its own (B_part, ...) block because every part runs through the backbone
separately (different sequence layouts); parts may have different batch sizes.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from model.images import to_model_input
from model.modalities import MODALITIES


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_text(ids: torch.Tensor, padding_mask: torch.Tensor, part: str) -> None:
    _check(ids.dim() == 2 and ids.dtype == torch.long,
           f"{part}: ids must be (B, L) int64, got {tuple(ids.shape)} {ids.dtype}")
    _check(padding_mask.shape == ids.shape and padding_mask.dtype == torch.bool,
           f"{part}: padding_mask must be (B, L) bool like ids, got {tuple(padding_mask.shape)} {padding_mask.dtype}")


def _check_image(pixels: torch.Tensor, visual_tokens: torch.Tensor, part: str) -> None:
    _check(pixels.dim() == 4 and pixels.shape[1] == 3 and pixels.is_floating_point(),
           f"{part}: pixels must be (B, 3, H, W) float, got {tuple(pixels.shape)} {pixels.dtype}")
    _check(visual_tokens.dim() == 2 and visual_tokens.dtype == torch.long and visual_tokens.shape[0] == pixels.shape[0],
           f"{part}: visual_tokens must be (B, N) int64 with B = {pixels.shape[0]}, "
           f"got {tuple(visual_tokens.shape)} {visual_tokens.dtype}")


class _Part:
    """Shared helpers: batch size and moving every tensor field to a device."""

    def to(self, device: torch.device | str, non_blocking: bool = False):
        values = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        return type(self)(**values)

    @property
    def batch_size(self) -> int:
        return getattr(self, fields(self)[0].name).shape[0]


@dataclass(frozen=True)
class TextPart(_Part):
    ids: torch.Tensor           # (B, L) int64, <s> ... </s> then pad
    padding_mask: torch.Tensor  # (B, L) bool, True = padding

    def __post_init__(self):
        _check_text(self.ids, self.padding_mask, "text")


@dataclass(frozen=True)
class ImagePart(_Part):
    pixels: torch.Tensor         # (B, 3, H, W) float in [-1, 1]
    visual_tokens: torch.Tensor  # (B, N) int64, N = (H / patch) * (W / patch), row-major

    def __post_init__(self):
        _check_image(self.pixels, self.visual_tokens, "image")


@dataclass(frozen=True)
class PairPart(_Part):
    pixels: torch.Tensor         # (B, 3, H, W) float in [-1, 1]
    visual_tokens: torch.Tensor  # (B, N) int64
    ids: torch.Tensor            # (B, L) int64 caption ids
    padding_mask: torch.Tensor   # (B, L) bool, True = padding

    def __post_init__(self):
        _check_image(self.pixels, self.visual_tokens, "pair")
        _check_text(self.ids, self.padding_mask, "pair")
        _check(self.ids.shape[0] == self.pixels.shape[0],
               f"pair: {self.pixels.shape[0]} images but {self.ids.shape[0]} captions")




@dataclass(frozen=True)
class MixedBatch:
    """Any of the three parts; at least one must be present."""

    text: TextPart | None = None
    image: ImagePart | None = None
    pair: PairPart | None = None

    def __post_init__(self):
        _check(any(getattr(self, name) is not None for name in MODALITIES), "MixedBatch needs at least one part")

    @property
    def parts(self) -> dict[str, TextPart | ImagePart | PairPart]:
        """The parts present, in the fixed order text, image, pair."""
        return {name: getattr(self, name) for name in MODALITIES if getattr(self, name) is not None}

    @property
    def num_samples(self) -> int:
        return sum(part.batch_size for part in self.parts.values())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MixedBatch:
        return MixedBatch(**{name: part.to(device, non_blocking) for name, part in self.parts.items()})


# ----------------------------------------------------------------------------- collate

def pad_texts(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists to the longest one -> ids (B, L) int64, padding_mask (B, L) bool."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    longest = int(lengths.max()) if len(sequences) else 0
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    padding_mask = torch.arange(longest).unsqueeze(0) >= lengths.unsqueeze(1)
    return ids, padding_mask


def _row_field(row: Mapping, key: str):
    value = row.get(key)
    if value is None or (hasattr(value, "__len__") and len(value) == 0):
        raise ValueError(f"row {row.get('id')!r} ({row.get('modality')}): field {key!r} is empty")
    return value


def _stack_images(rows: Sequence[Mapping]) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = [to_model_input(_row_field(r, "image")) for r in rows]
    tokens = [torch.as_tensor(list(_row_field(r, "visual_tokens")), dtype=torch.long) for r in rows]
    for r, p, t in zip(rows, pixels, tokens):
        if p.shape != pixels[0].shape or t.shape != tokens[0].shape:
            raise ValueError(f"row {r.get('id')!r}: image {tuple(p.shape)} / {t.numel()} visual tokens differ from "
                             f"the batch's first row {tuple(pixels[0].shape)} / {tokens[0].numel()}")
        if t.numel() and int(t.min()) < 0:
            # int16 storage of a codebook larger than 32768 would wrap; never guess, say so.
            raise ValueError(f"row {r.get('id')!r}: negative visual token {int(t.min())}")
    return torch.stack(pixels), torch.stack(tokens)


def collate_rows(rows: Iterable[Mapping], pad_id: int) -> MixedBatch:
    """Build a MixedBatch from shard rows (DESIGN §5 schema: id, modality, text_ids, image,
    visual_tokens). Rows are grouped by modality, keeping their order within each part; text
    is padded to the longest sequence of its part with pad_id. Unknown modalities and missing
    fields raise ValueError naming the row id.
    """
    groups: dict[str, list[Mapping]] = {name: [] for name in MODALITIES}
    for row in rows:
        modality = row.get("modality")
        if modality not in groups:
            raise ValueError(f"row {row.get('id')!r}: unknown modality {modality!r}, expected one of {MODALITIES}")
        groups[modality].append(row)
    parts: dict[str, _Part] = {}
    if groups["text"]:
        ids, pad = pad_texts([_row_field(r, "text_ids") for r in groups["text"]], pad_id)
        parts["text"] = TextPart(ids, pad)
    if groups["image"]:
        parts["image"] = ImagePart(*_stack_images(groups["image"]))
    if groups["pair"]:
        pixels, tokens = _stack_images(groups["pair"])
        ids, pad = pad_texts([_row_field(r, "text_ids") for r in groups["pair"]], pad_id)
        parts["pair"] = PairPart(pixels, tokens, ids, pad)
    return MixedBatch(**parts)
