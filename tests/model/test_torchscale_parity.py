"""Parity with the reference implementation: torchscale 0.3.0's BEiT3 (float32, CPU).

Random weights in torchscale's layout go through load_official_beit3, and our
encode must reproduce torchscale's encoder_out to <= 1e-4 (padded text
positions excluded). torchscale is installed with --no-deps (see .ci/run);
its fairscale/timm imports are served by tests/model/torchscale_shims.
"""
from __future__ import annotations

import pytest
import torch

from model.beit3 import BEiT3
from model.checkpoint import export_official_beit3, load_official_beit3, official_key_map
from model.config import beit3_preset
from tests.torchscale_reference import torchscale_model

TOLERANCE = 1e-4


def randomize_(module, seed=0):
    """Distinct random values everywhere, LayerNorm gains near 1, so any mixed-up key shows."""
    gen = torch.Generator().manual_seed(seed)
    norm_gains = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if id(p) in norm_gains else 0.1 * noise)


@pytest.fixture(scope="module")
def config():
    return beit3_preset("tiny", dim=64, depth=2, num_heads=4, ffn_dim=128, image_size=48,
                        vocab_size=500, max_text_positions=40)


@pytest.fixture(scope="module", params=[True, False], ids=["final_norm", "no_final_norm"])
def pair_of_models(request, config):
    torch.manual_seed(0)
    reference = torchscale_model(config, normalize_output=request.param)
    randomize_(reference)
    reference.eval()
    official = {"model": {"beit3." + k: v for k, v in reference.state_dict().items()}}
    ours = load_official_beit3(official, "tiny", dim=64, depth=2, num_heads=4, ffn_dim=128,
                               vocab_size=500, max_text_positions=40)
    assert ours.config.final_norm is request.param
    assert ours.config.image_size == config.image_size
    return reference, ours


@pytest.fixture(scope="module")
def inputs(config):
    gen = torch.Generator().manual_seed(1)
    batch, length = 3, 9
    image = torch.rand(batch, 3, config.image_size, config.image_size, generator=gen) * 2 - 1
    text = torch.randint(3, config.vocab_size, (batch, length), generator=gen)
    lengths = torch.tensor([length, 5, 1])
    padding = torch.arange(length)[None, :] >= lengths[:, None]  # True = padding
    text = text.masked_fill(padding, 1)  # <pad> id, as the tokenizer pads
    image_mask = torch.rand(batch, config.num_patches, generator=gen) < 0.4
    return image, text, padding, image_mask


def max_diff(a, b, keep=None):
    assert a.shape == b.shape
    diff = (a - b).abs()
    if keep is not None:
        diff = diff[keep]
    return diff.max().item()


@torch.no_grad()
def test_image_only_matches_torchscale(pair_of_models, inputs):
    reference, ours = pair_of_models
    image, _, _, image_mask = inputs
    expected = reference(visual_tokens=image)["encoder_out"]
    diff = max_diff(ours.encode(image=image), expected)
    print(f"image-only max abs diff {diff:.3g}")
    assert diff <= TOLERANCE
    expected = reference(visual_tokens=image, vision_masked_position=image_mask)["encoder_out"]
    diff = max_diff(ours.encode(image=image, image_mask=image_mask), expected)
    print(f"masked image max abs diff {diff:.3g}")
    assert diff <= TOLERANCE


@torch.no_grad()
def test_text_only_with_padding_matches_torchscale(pair_of_models, inputs):
    reference, ours = pair_of_models
    _, text, padding, _ = inputs
    expected = reference(textual_tokens=text, text_padding_position=padding)["encoder_out"]
    got = ours.encode(text=text, text_padding_mask=padding)
    diff = max_diff(got, expected, keep=~padding)
    print(f"text-only max abs diff {diff:.3g}")
    assert diff <= TOLERANCE


@torch.no_grad()
def test_image_text_with_padding_matches_torchscale(pair_of_models, inputs):
    reference, ours = pair_of_models
    image, text, padding, image_mask = inputs
    keep = torch.cat([torch.ones(text.shape[0], 1 + ours.num_patches, dtype=torch.bool), ~padding], 1)
    expected = reference(textual_tokens=text, visual_tokens=image,
                         text_padding_position=padding)["encoder_out"]
    got = ours.encode(image=image, text=text, text_padding_mask=padding)
    diff = max_diff(got, expected, keep=keep)
    print(f"image+text max abs diff {diff:.3g}")
    assert diff <= TOLERANCE
    expected = reference(textual_tokens=text, visual_tokens=image, text_padding_position=padding,
                         vision_masked_position=image_mask)["encoder_out"]
    got = ours.encode(image=image, text=text, text_padding_mask=padding, image_mask=image_mask)
    assert max_diff(got, expected, keep=keep) <= TOLERANCE


def test_export_gives_back_torchscale_tensors(pair_of_models):
    reference, ours = pair_of_models
    exported = export_official_beit3(ours)["model"]
    expected = {"beit3." + k: v for k, v in reference.state_dict().items()}
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key


def test_base_preset_has_torchscale_base_shapes():
    """The base preset, built on the meta device, has torchscale's base layout exactly."""
    cfg = beit3_preset("base")
    with torch.device("meta"):
        reference = torchscale_model(cfg)
        ours = BEiT3(cfg)
    expected = {"beit3." + k: tuple(v.shape) for k, v in reference.state_dict().items()}
    exported = {k: tuple(v.shape) for k, v in export_official_beit3(ours)["model"].items()}
    assert exported == expected
    assert {k for ks in official_key_map(cfg).values() for k in ks} == expected.keys()
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert round(count / 1e6, 1) == 221.0
