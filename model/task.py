"""The unified masked-data-modeling task of BEiT-3: mask, encode, predict, score.

    text  part: mask 15% of the maskable tokens (BERT 80/10/10)      -> text_mlm
    image part: block-mask 40% of the patches                         -> image_mim
    pair  part: mask 50% of the caption tokens, and (default) 40% of
                the image patches, in one joint image+text forward   -> pair_mlm, pair_mim

The same module serves training and evaluation (pass a seeded generator when evaluating so
every run masks the same positions).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.batch import ImagePart, MixedBatch, PairPart, TextPart  # noqa: F401  (MixedBatch re-exported)
from model.heads import PretrainHeads
from model.images import resize_views
from model.masking import (Generator, TextMask, as_generator, block_mask, mask_text, num_to_mask,
                           replacement_ids, token_grid)

PART_KEYS = ("text_mlm", "image_mim", "pair_mlm", "pair_mim")


@dataclass(frozen=True)
class MaskingConfig:
    text_ratio: float = 0.15       # of the maskable tokens of plain text
    caption_ratio: float = 0.5     # of the maskable tokens of pair captions
    image_ratio: float = 0.4       # of the patch grid of images
    pair_image_ratio: float = 0.4  # of the patch grid of pair images; 0 disables pair MIM
    min_block: int = 16            # smallest block of BEiT block-wise masking, in patches

    def __post_init__(self):
        for name in ("text_ratio", "caption_ratio", "image_ratio"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"masking.{name} must be in (0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.pair_image_ratio < 1.0:
            raise ValueError(f"masking.pair_image_ratio must be in [0, 1), got {self.pair_image_ratio}")
        if self.min_block < 1:
            raise ValueError(f"masking.min_block must be >= 1, got {self.min_block}")


@dataclass(frozen=True)
class PretrainMasks:
    """Masks for one MixedBatch; a part's entries are None when the part is absent (and
    pair_image is None when pair MIM is disabled)."""

    text: TextMask | None = None
    image: torch.Tensor | None = None       # (B_image, N) bool, True = masked patch
    pair_text: TextMask | None = None
    pair_image: torch.Tensor | None = None  # (B_pair, N) bool

    def to(self, device, non_blocking: bool = False) -> PretrainMasks:
        def move(x):
            if isinstance(x, TextMask):
                return TextMask(x.input_ids.to(device, non_blocking=non_blocking),
                                x.selected.to(device, non_blocking=non_blocking))
            return None if x is None else x.to(device, non_blocking=non_blocking)
        return PretrainMasks(move(self.text), move(self.image), move(self.pair_text), move(self.pair_image))


class Masker:
    """Builds PretrainMasks for a MixedBatch. Plain object (no parameters), so a data loader
    can build masks in its workers and hand them to PretrainTask.forward(masks=...)."""

    def __init__(self, masking: MaskingConfig, text_vocab_size: int, special_ids: Sequence[int],
                 mask_id: int, patch_size: int):
        self.masking = masking
        self.mask_id = mask_id
        self.patch_size = patch_size
        self.special_ids = torch.tensor(sorted(set(special_ids) | {mask_id}), dtype=torch.long)
        if int(self.special_ids.max()) >= text_vocab_size or int(self.special_ids.min()) < 0:
            raise ValueError(f"special/mask ids {self.special_ids.tolist()} outside the vocabulary "
                             f"of {text_vocab_size}")
        self._random_ids = {torch.device("cpu"): replacement_ids(text_vocab_size, self.special_ids)}

    def _pool(self, device: torch.device) -> torch.Tensor:
        if device not in self._random_ids:  # one copy per device, not one per step
            self._random_ids[device] = self._random_ids[torch.device("cpu")].to(device)
        return self._random_ids[device]

    def text(self, ids: torch.Tensor, padding_mask: torch.Tensor, ratio: float, gen: Generator) -> TextMask:
        """ids, padding_mask (B, L) -> TextMask; gen: a generator / seed / None, or B per-sample
        generators (each sample's mask then depends on its own generator only)."""
        maskable = ~padding_mask & ~torch.isin(ids, self.special_ids.to(ids.device))
        return mask_text(ids, maskable, ratio, self.mask_id, self._pool(ids.device), gen,
                         padding_mask=padding_mask)

    def image(self, part: ImagePart | PairPart, ratio: float, gen: Generator) -> torch.Tensor:
        """-> (B, N) bool block mask of the visual tokens' patch grid; gen as in `text`."""
        n = part.visual_tokens.shape[1]
        return block_mask(part.batch_size, token_grid(n), num_to_mask(ratio, n), self.masking.min_block,
                          generator=gen, device=part.pixels.device)

    def __call__(self, batch: MixedBatch, generator: Generator = None) -> PretrainMasks:
        gen, cfg, masks = as_generator(generator), self.masking, {}
        if isinstance(gen, list):
            raise ValueError("per-sample generators go to Masker.text / Masker.image, one list per part")
        if batch.text is not None:
            masks["text"] = self.text(batch.text.ids, batch.text.padding_mask, cfg.text_ratio, gen)
        if batch.image is not None:
            masks["image"] = self.image(batch.image, cfg.image_ratio, gen)
        if batch.pair is not None:
            masks["pair_text"] = self.text(batch.pair.ids, batch.pair.padding_mask, cfg.caption_ratio, gen)
            if cfg.pair_image_ratio > 0:
                masks["pair_image"] = self.image(batch.pair, cfg.pair_image_ratio, gen)
        return PretrainMasks(**masks)


@dataclass
class TaskOutput:
    """loss: scalar with grad. losses / accuracies / counts: per part key (PART_KEYS), detached
    0-dim tensors (no host sync; call float()/int() when logging). A part present in the batch
    but with no masked position has counts[key] == 0 and no loss/accuracy entry."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    accuracies: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]


class PretrainTask(nn.Module):
    """Backbone + MLM/MIM heads + masking -> TaskOutput.

    model: a backbone with `encode(image=None, text=None, text_padding_mask=None,
    image_mask=None) -> (B, T, D)` (vision cls, patches, then text) and `config.dim`,
    `config.patch_size`, `config.vocab_size`.

    Loss weighting: the total loss is the unweighted mean of the per-part mean cross-entropies
    of the parts present. Pooling all masked positions instead would weight each objective by
    its number of masked positions (78 patches per image vs ~10 tokens per text), so the image
    objectives would dominate and the balance would drift with sequence lengths, mask ratios
    and the batch mixture. The paper states no weighting; the mean keeps every objective at
    the same scale whatever the lengths and the mixture.
    """

    def __init__(self, model: nn.Module, text_vocab_size: int, visual_vocab_size: int,
                 masking: MaskingConfig = MaskingConfig(), special_ids: Sequence[int] = (0, 1, 2, 3), *,
                 mask_id: int, pad_id: int | None = None, head_bias: bool = False):
        super().__init__()
        config = model.config
        if text_vocab_size > config.vocab_size:
            raise ValueError(f"text_vocab_size {text_vocab_size} exceeds the backbone's embedding "
                             f"vocabulary {config.vocab_size}")
        specials = set(special_ids) | ({pad_id} if pad_id is not None else set())
        self.model = model
        self.heads = PretrainHeads(config.dim, text_vocab_size, visual_vocab_size, bias=head_bias)
        self.masker = Masker(masking, text_vocab_size, sorted(specials), mask_id, config.patch_size)

    def _score(self, key, logits, targets, out: dict) -> None:
        out["counts"][key] = torch.tensor(targets.numel(), device=targets.device)
        if targets.numel() == 0:
            return
        out["losses"][key] = F.cross_entropy(logits.float(), targets)
        with torch.no_grad():
            out["accuracies"][key] = (logits.argmax(-1) == targets).float().mean()

    def _text(self, part: TextPart, mask: TextMask, out: dict) -> None:
        hidden = self.model.encode(text=mask.input_ids, text_padding_mask=part.padding_mask)  # (B, L, D)
        self._score("text_mlm", self.heads.text(hidden, mask.selected), part.ids[mask.selected], out)

    def _pixels(self, part: ImagePart | PairPart) -> torch.Tensor:
        """The part's views at the model's image size (B, 3, S, S); the model's patch grid must
        be the visual tokens' grid (checked here, where a mismatch would mis-align targets)."""
        config = self.model.config
        side = config.image_size // config.patch_size
        if (side, side) != token_grid(part.visual_tokens.shape[1]):
            grid = token_grid(part.visual_tokens.shape[1])
            raise ValueError(f"the model's patch grid is {side}x{side} (image {config.image_size}, patch "
                             f"{config.patch_size}) but the visual tokens form a {grid[0]}x{grid[1]} grid")
        return resize_views(part.pixels, config.image_size)

    def _image(self, part: ImagePart, mask: torch.Tensor, out: dict) -> None:
        hidden = self.model.encode(image=self._pixels(part), image_mask=mask)  # (B, 1 + N, D)
        self._score("image_mim", self.heads.image(hidden[:, 1:], mask), part.visual_tokens[mask], out)

    def _pair(self, part: PairPart, text_mask: TextMask, image_mask, out: dict) -> None:
        hidden = self.model.encode(image=self._pixels(part), text=text_mask.input_ids,
                                   text_padding_mask=part.padding_mask, image_mask=image_mask)  # (B, 1 + N + L, D)
        split = 1 + part.visual_tokens.shape[1]
        if hidden.shape[1] != split + part.ids.shape[1]:
            raise ValueError(f"backbone returned {hidden.shape[1]} positions, expected {split} + {part.ids.shape[1]}")
        selected = text_mask.selected
        self._score("pair_mlm", self.heads.text(hidden[:, split:], selected), part.ids[selected], out)
        if image_mask is not None:
            self._score("pair_mim", self.heads.image(hidden[:, 1:split], image_mask),
                        part.visual_tokens[image_mask], out)

    def forward(self, batch: MixedBatch, generator: Generator = None, masks: PretrainMasks | None = None,
                part_weights: Mapping[str, float] | None = None) -> TaskOutput:
        """batch: any of text / image / pair; masks: precomputed (e.g. by a data loader's
        Masker), else built here from `generator` (a torch.Generator, an int seed or None).
        part_weights: the loss is sum(weight * part loss) instead of the mean over parts, so
        a batch cut into pieces (micro-batches, text chunks) can add up to the whole batch's
        loss: weight = the piece's masked count / the batch's count / the batch's parts."""
        masks = self.masker(batch, generator) if masks is None else masks
        _check_masks(batch, masks)
        out = {"losses": {}, "accuracies": {}, "counts": {}}
        if batch.text is not None:
            self._text(batch.text, masks.text, out)
        if batch.image is not None:
            self._image(batch.image, masks.image, out)
        if batch.pair is not None:
            self._pair(batch.pair, masks.pair_text, masks.pair_image, out)
        losses = out["losses"]
        if losses and part_weights is not None:
            loss = sum(v * part_weights.get(k, 0.0) for k, v in losses.items())
        elif losses:
            loss = torch.stack(list(losses.values())).mean()
        else:  # nothing masked anywhere: a zero that still backpropagates (to no effect)
            loss = sum(p.sum() for p in self.heads.parameters()) * 0.0
        return TaskOutput(loss, {k: v.detach() for k, v in losses.items()}, out["accuracies"], out["counts"])


def _check_masks(batch: MixedBatch, masks: PretrainMasks) -> None:
    """Every present part has its masks, with the part's shapes."""
    expected = {"text": ("text", "ids"), "image": ("image", "visual_tokens"),
                "pair_text": ("pair", "ids"), "pair_image": ("pair", "visual_tokens")}
    for name, (part_name, field) in expected.items():
        part, mask = getattr(batch, part_name), getattr(masks, name)
        if part is None or (mask is None and name == "pair_image"):
            continue
        if mask is None:
            raise ValueError(f"batch has a {part_name} part but masks.{name} is None")
        selected = mask.selected if isinstance(mask, TextMask) else mask
        if selected.shape != getattr(part, field).shape or selected.dtype != torch.bool:
            raise ValueError(f"masks.{name} is {tuple(selected.shape)} {selected.dtype}, "
                             f"expected bool {tuple(getattr(part, field).shape)}")
