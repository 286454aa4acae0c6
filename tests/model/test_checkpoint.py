"""Official unilm/beit3 layout both ways, and our safetensors + config.json checkpoints."""
from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from model.beit3 import BEiT3
from model.checkpoint import (
    export_official_beit3,
    load_official_beit3,
    load_pretrained,
    save_pretrained,
)
from model.config import beit3_preset

torch.set_num_threads(2)
SMALL = dict(dim=64, num_heads=4, ffn_dim=128, depth=2, vocab_size=200, image_size=48)


def small_model(**overrides):
    torch.manual_seed(0)
    return BEiT3(beit3_preset("tiny", **{**SMALL, **overrides}))


def official_of(model):
    return export_official_beit3(model)


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_official_round_trip_is_tensor_for_tensor_identical(tmp_path):
    model = small_model()
    exported = official_of(model)
    assert all(k.startswith("beit3.") for k in exported["model"])
    assert "beit3.encoder.layers.1.self_attn.q_proj.B.weight" in exported["model"]
    path = tmp_path / "beit3.pth"
    torch.save(exported, path)
    loaded = load_official_beit3(path, "tiny", **{k: v for k, v in SMALL.items() if k != "image_size"})
    assert loaded.config == model.config
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    assert_same_tensors(official_of(loaded)["model"], exported["model"])


def test_task_head_keys_are_ignored_and_reported(caplog):
    model = small_model()
    state = official_of(model)["model"]
    heads = {"vision_head.weight": torch.zeros(64, 64), "language_head.weight": torch.zeros(64, 64),
             "logit_scale": torch.tensor(2.0)}
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        loaded = load_official_beit3({"model": {**state, **heads}}, model.config)
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    message = caplog.text
    assert "3 task-head keys" in message and all(k in message for k in heads)


def test_missing_or_unexpected_backbone_keys_are_named():
    model = small_model()
    state = dict(official_of(model)["model"])
    gone = "beit3.encoder.layers.1.ffn.B.ffn_layernorm.bias"
    del state[gone]
    with pytest.raises(ValueError, match=f"missing backbone keys \\(1\\): {gone}"):
        load_official_beit3({"model": state}, model.config)
    state = dict(official_of(model)["model"])
    extra = "beit3.encoder.layers.0.self_attn.rel_pos.weight"
    state[extra] = torch.zeros(3)
    with pytest.raises(ValueError, match=f"unexpected backbone keys \\(1\\): {extra}"):
        load_official_beit3({"model": state}, model.config)
    deeper = beit3_preset("tiny", **{**SMALL, "depth": 3})
    with pytest.raises(ValueError, match="encoder.layers.2.self_attn.q_proj.A.weight"):
        load_official_beit3(official_of(model), deeper)


def test_wrong_shapes_and_foreign_files_are_clear_errors():
    model = small_model()
    with pytest.raises(ValueError, match="text_embed.weight: checkpoint \\(200, 64\\) vs model \\(300, 64\\)"):
        load_official_beit3(official_of(model), beit3_preset("tiny", **{**SMALL, "vocab_size": 300}))
    with pytest.raises(ValueError, match="no 'beit3.\\*' weights"):
        load_official_beit3({"model": {"head.weight": torch.zeros(2)}}, "base")
    with pytest.raises(ValueError, match="only the released variant"):
        export_official_beit3(small_model(variant="paper"))


def test_preset_name_reads_image_size_and_final_norm_from_the_checkpoint():
    """ImageNet / VQA task models are built with normalize_output=False: no encoder.layer_norm."""
    model = small_model(final_norm=False, image_size=80)
    state = official_of(model)["model"]
    assert not any(".encoder.layer_norm." in k for k in state)
    loaded = load_official_beit3(state, "tiny", **{k: v for k, v in SMALL.items() if k != "image_size"})
    assert loaded.config.final_norm is False and loaded.config.image_size == 80
    assert_same_tensors(loaded.state_dict(), model.state_dict())


def test_loading_an_in_memory_state_dict_copies_it():
    model = small_model()
    state = official_of(model)["model"]
    loaded = load_official_beit3(state, model.config, drop_path=0.1)
    assert loaded.config.drop_path == 0.1 and not loaded.training
    state["beit3.text_embed.weight"].add_(1.0)
    assert torch.equal(loaded.text_embed.weight, model.text_embed.weight)


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_save_and_load_pretrained(tmp_path, variant):
    model = small_model(variant=variant, drop_path=0.1)
    save_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["format"] == "beit3-pipeline" and meta["config"]["variant"] == variant
    loaded = load_pretrained(tmp_path / "out")
    assert loaded.config == model.config and not loaded.training
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    image = torch.rand(2, 3, 48, 48) * 2 - 1
    text = torch.randint(3, 200, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded(image, text), model.eval()(image, text))
    again = load_pretrained(tmp_path / "out", checkpoint_activations=True)
    assert again.config.checkpoint_activations


def test_load_pretrained_rejects_other_files(tmp_path):
    save_pretrained(small_model(), tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(ValueError, match="not a beit3-pipeline checkpoint"):
        load_pretrained(tmp_path)
    meta["config"]["hidden"] = 3
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown keys \\['hidden'\\]"):
        load_pretrained(tmp_path)


def test_official_export_pads_the_text_table_to_the_official_rows():
    """unilm/beit3 builds a 64010-row text table; a smaller tokenizer's table is padded with
    unused zero rows, and the model's rows come first, unchanged."""
    from model.checkpoint import OFFICIAL_TEXT_ROWS, TEXT_EMBED

    model = small_model()
    ours = model.state_dict()["text_embed.weight"]
    padded = export_official_beit3(model, text_rows=OFFICIAL_TEXT_ROWS)["model"][TEXT_EMBED]
    assert padded.shape == (OFFICIAL_TEXT_ROWS, ours.shape[1])
    assert torch.equal(padded[:ours.shape[0]], ours) and not padded[ours.shape[0]:].any()
    config = dataclasses.replace(model.config, vocab_size=OFFICIAL_TEXT_ROWS)
    reloaded = load_official_beit3(export_official_beit3(model, text_rows=OFFICIAL_TEXT_ROWS), config)
    assert torch.equal(reloaded.text_embed.weight[:ours.shape[0]], ours)
