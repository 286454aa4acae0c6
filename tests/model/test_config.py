"""BEiT3Config presets and value checks."""
from __future__ import annotations

import dataclasses

import pytest

from model.config import PRESET_NAMES, BEiT3Config, beit3_preset


def test_presets_have_the_design_shapes():
    shapes = {name: beit3_preset(name) for name in PRESET_NAMES}
    assert [(c.dim, c.depth, c.num_heads, c.ffn_dim, c.patch_size) for c in shapes.values()] == [
        (192, 4, 4, 768, 16), (768, 12, 12, 3072, 16), (1024, 24, 16, 4096, 16),
        (1408, 40, 16, 6144, 14)]
    for cfg in shapes.values():
        assert cfg.variant == "released" and cfg.vl_expert_layers == 0
        assert cfg.vocab_size == 64010 and cfg.max_text_positions == 1024
        assert cfg.layernorm_eps == 1e-5 and cfg.final_norm and cfg.drop_path == 0.0
    assert shapes["base"].num_patches == 196 and shapes["giant"].num_patches == 256
    assert shapes["tiny"].image_size == 96 and shapes["tiny"].num_patches == 36


def test_paper_variant_defaults_and_overrides():
    assert beit3_preset("giant", "paper").vl_expert_layers == 3
    assert beit3_preset("base", variant="paper").vl_expert_layers == 2
    cfg = beit3_preset("tiny", "paper", vl_expert_layers=2, image_size=224, drop_path=0.1,
                       checkpoint_activations=True, vocab_size=2000)
    assert (cfg.vl_expert_layers, cfg.image_size, cfg.num_patches) == (2, 224, 196)
    assert cfg.drop_path == 0.1 and cfg.checkpoint_activations and cfg.vocab_size == 2000


def test_config_is_frozen_and_round_trips_through_a_dict():
    cfg = beit3_preset("tiny", "paper")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 10
    assert BEiT3Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys \\['width'\\]"):
        BEiT3Config.from_dict({**cfg.to_dict(), "width": 3})


@pytest.mark.parametrize("overrides, message", [
    (dict(num_heads=5), "divisible by num_heads"),
    (dict(image_size=100), "multiple of patch_size"),
    (dict(dim=0), "dim must be a positive int"),
    (dict(depth=2.5), "depth must be a positive int"),
    (dict(drop_path=1.0), "drop_path"),
    (dict(drop_path=-0.1), "drop_path"),
    (dict(layernorm_eps=0.0), "layernorm_eps"),
    (dict(max_text_positions=2), "max_text_positions"),
    (dict(vl_expert_layers=1), "must be 0 for the released variant"),
])
def test_bad_values_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        beit3_preset("tiny", **overrides)


def test_bad_names_are_rejected():
    with pytest.raises(ValueError, match="unknown BEiT-3 preset 'huge'"):
        beit3_preset("huge")
    with pytest.raises(ValueError, match="unknown override 'hidden_size'"):
        beit3_preset("tiny", hidden_size=3)
    with pytest.raises(ValueError, match="variant must be one of"):
        beit3_preset("tiny", "published")
    with pytest.raises(ValueError, match="vl_expert_layers must be an int in \\[0, depth=4\\]"):
        beit3_preset("tiny", "paper", vl_expert_layers=5)
