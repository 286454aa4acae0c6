"""BEiT-3 backbone configuration and the named presets.

The ``released`` variant is the architecture of the public checkpoints
(torchscale 0.3.0 ``BEiT3``, multiway=True, subln=True); ``paper`` is the
variant the paper describes (shared attention, vision-language FFN experts in
the top ``vl_expert_layers`` layers), for which no public code exists. Our
reading, as in VLMo: the attention pre-LN and sub-LN are shared with the
attention, each FFN expert (vision, text, vision-language) has its own pre-LN,
and the final LN stays per modality.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

VARIANTS = ("released", "paper")

# Text positions, like fairseq, start at index 2: rows 0 and 1 are never used.
POSITION_OFFSET = 2


@dataclass(frozen=True)
class BEiT3Config:
    """Shapes and options of one BEiT-3 backbone (no pretraining heads)."""

    dim: int
    depth: int
    num_heads: int
    ffn_dim: int
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 64010
    # rows of the text position table; the longest text is this minus POSITION_OFFSET
    max_text_positions: int = 1024
    layernorm_eps: float = 1e-5
    # the official `normalize_output`; some fine-tuned task models (ImageNet, VQA) have none
    final_norm: bool = True
    drop_path: float = 0.0
    variant: Literal["released", "paper"] = "released"
    # paper variant: the top K layers get a vision-language FFN expert (0 for released)
    vl_expert_layers: int = 0
    checkpoint_activations: bool = False

    def __post_init__(self):
        for name in ("dim", "depth", "num_heads", "ffn_dim", "image_size", "patch_size",
                     "in_chans", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BEiT3Config.{name} must be a positive int, got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(
                f"BEiT3Config.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(f"BEiT3Config.image_size ({self.image_size}) must be a multiple "
                             f"of patch_size ({self.patch_size})")
        if not isinstance(self.max_text_positions, int) or self.max_text_positions <= POSITION_OFFSET:
            raise ValueError(f"BEiT3Config.max_text_positions must be an int > {POSITION_OFFSET}, "
                             f"got {self.max_text_positions!r}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"BEiT3Config.drop_path must be in [0, 1), got {self.drop_path!r}")
        if not self.layernorm_eps > 0:
            raise ValueError(f"BEiT3Config.layernorm_eps must be > 0, got {self.layernorm_eps!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"BEiT3Config.variant must be one of {VARIANTS}, got {self.variant!r}")
        if not isinstance(self.vl_expert_layers, int) or not 0 <= self.vl_expert_layers <= self.depth:
            raise ValueError(f"BEiT3Config.vl_expert_layers must be an int in [0, depth={self.depth}], "
                             f"got {self.vl_expert_layers!r}")
        if self.variant == "released" and self.vl_expert_layers:
            raise ValueError("BEiT3Config.vl_expert_layers must be 0 for the released variant "
                             "(it has no vision-language expert); use variant='paper'")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of the (square) image."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def max_text_len(self) -> int:
        return self.max_text_positions - POSITION_OFFSET

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BEiT3Config":
        """Inverse of ``to_dict``; unknown keys are an error that names them."""
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"BEiT3Config: unknown keys {unknown}; allowed: {sorted(allowed)}")
        return cls(**data)


# name -> (shape fields, top-K VL-expert layers of the paper variant)
_PRESETS: dict[str, tuple[dict, int]] = {
    # CPU demo and tests: 96 px images, 6x6 patch grid
    "tiny": (dict(dim=192, depth=4, num_heads=4, ffn_dim=768, image_size=96, patch_size=16), 1),
    "base": (dict(dim=768, depth=12, num_heads=12, ffn_dim=3072, image_size=224, patch_size=16), 2),
    "large": (dict(dim=1024, depth=24, num_heads=16, ffn_dim=4096, image_size=224, patch_size=16), 3),
    "giant": (dict(dim=1408, depth=40, num_heads=16, ffn_dim=6144, image_size=224, patch_size=14), 3),
}
PRESET_NAMES = tuple(_PRESETS)


def beit3_preset(name: str, variant: str = "released", **overrides) -> BEiT3Config:
    """The named preset (tiny|base|large|giant) of a variant, with field overrides.

    The paper variant's default ``vl_expert_layers`` is 1 (tiny), 2 (base, as
    VLMo-Base), 3 (large, and giant as in the BEiT-3 paper).
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown BEiT-3 preset {name!r}; choose one of {list(_PRESETS)}")
    allowed = {f.name for f in dataclasses.fields(BEiT3Config)} - {"variant"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"beit3_preset: unknown override {unknown[0]!r}; allowed: {sorted(allowed)}")
    shape, paper_vl_layers = _PRESETS[name]
    fields = dict(shape, variant=variant)
    if variant == "paper":
        fields["vl_expert_layers"] = paper_vl_layers
    fields.update(overrides)
    return BEiT3Config(**fields)
