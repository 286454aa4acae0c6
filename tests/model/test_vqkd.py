"""VQ-KD inference: official layout, reference codes, batch invariance, safetensors, preprocess."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.images import preprocess
from model.vqkd import VQKD, VQKDConfig, config_from_state, vqkd_preset

torch.set_num_threads(1)

# Same layout as official-base, shrunk: heads = dim / 64 as in every released model.
SMALL = dict(image_size=64, patch_size=16, encoder_dim=128, encoder_depth=2, encoder_heads=2,
             decoder_dim=128, decoder_heads=2, n_codes=64, code_dim=32, out_dim=48)


def small_model(decoder_depth: int = 1, seed: int = 0) -> VQKD:
    """Randomly initialised model with a random l2-normalised codebook (as if trained)."""
    torch.manual_seed(seed)
    model = VQKD(VQKDConfig(decoder_depth=decoder_depth, **SMALL)).eval()
    with torch.no_grad():
        emb = model.quantize.embedding
        emb.weight.copy_(F.normalize(torch.randn_like(emb.weight), dim=1))
        emb.embed_avg.copy_(emb.weight)
        emb.initted.fill_(1.0)
        for p in model.parameters():  # spread the features so codes differ across patches
            if p.requires_grad and p.dim() > 1:
                p.mul_(3.0)
    return model


def images(n: int, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def save_official(model: VQKD, path, wrapper: str = "model", extra: dict | None = None) -> None:
    state = model.official_state_dict()
    # training-only entries that the released files carry and the loader must drop
    state.update({"teacher_model.visual.proj": torch.randn(4, 4), "scaling_layer.shift": torch.zeros(3),
                  "loss.dummy": torch.zeros(1)})
    state.update(extra or {})
    torch.save({wrapper: state, "epoch": 99}, path)


@pytest.mark.parametrize("decoder_depth,wrapper", [(1, "model"), (3, "state_dict")])
def test_official_layout_roundtrip_gives_same_codes(tmp_path, decoder_depth, wrapper):
    model = small_model(decoder_depth)
    x = images(3)
    path = tmp_path / "vqkd.pth"
    save_official(model, path, wrapper)
    loaded = VQKD.from_official(str(path))
    assert loaded.config == model.config  # architecture read off the shapes
    assert loaded.config.decoder_depth == decoder_depth
    codes = model.codes(x)
    assert codes.dtype == torch.long and codes.shape == (3, model.config.num_patches)
    assert torch.equal(loaded.codes(x), codes)
    assert len(codes.unique()) > 5  # a meaningful comparison, not all one code


def test_from_official_names_every_mismatch(tmp_path):
    model = small_model()
    state = model.official_state_dict()
    del state["encoder.fc_norm.bias"]
    state["encoder.blocks.0.attn.k_bias"] = torch.zeros(128)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError) as err:
        VQKD.from_official(str(path))
    assert "encoder.fc_norm.bias" in str(err.value) and "encoder.blocks.0.attn.k_bias" in str(err.value)

    good = tmp_path / "good.pth"
    save_official(model, good)
    wrong = VQKDConfig(decoder_depth=1, **{**SMALL, "n_codes": 32})
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight: checkpoint \(64, 32\)"):
        VQKD.from_official(str(good), config=wrong)

    torch.save({"weights": state}, tmp_path / "nowrap.pth")
    with pytest.raises(ValueError, match="'model' or 'state_dict'"):
        VQKD.from_official(str(tmp_path / "nowrap.pth"))


def test_official_base_has_the_released_key_layout():
    """Every key and shape of vqkd_encoder_base_decoder_{3x,1x}768x12_clip (DESIGN §4)."""
    def expected(decoder_depth):
        keys = {"quantize.cluster_size": (8192,), "quantize.embedding.weight": (8192, 32),
                "quantize.embedding.cluster_size": (8192,), "quantize.embedding.embed_avg": (8192, 32),
                "quantize.embedding.initted": (1,),
                "encode_task_layer.0.weight": (768, 768), "encode_task_layer.0.bias": (768,),
                "encode_task_layer.2.weight": (32, 768), "encode_task_layer.2.bias": (32,),
                "decode_task_layer.0.weight": (768, 768), "decode_task_layer.0.bias": (768,),
                "decode_task_layer.2.weight": (512, 768), "decode_task_layer.2.bias": (512,)}
        for part, depth, in_ch, patch in (("encoder", 12, 3, 16), ("decoder", decoder_depth, 32, 1)):
            keys.update({f"{part}.cls_token": (1, 1, 768), f"{part}.pos_embed": (1, 197, 768),
                         f"{part}.patch_embed.proj.weight": (768, in_ch, patch, patch),
                         f"{part}.patch_embed.proj.bias": (768,),
                         f"{part}.fc_norm.weight": (768,), f"{part}.fc_norm.bias": (768,)})
            for i in range(depth):
                b = f"{part}.blocks.{i}."
                keys.update({b + "norm1.weight": (768,), b + "norm1.bias": (768,),
                             b + "norm2.weight": (768,), b + "norm2.bias": (768,),
                             b + "attn.qkv.weight": (2304, 768), b + "attn.q_bias": (768,),
                             b + "attn.v_bias": (768,), b + "attn.proj.weight": (768, 768),
                             b + "attn.proj.bias": (768,), b + "mlp.fc1.weight": (3072, 768),
                             b + "mlp.fc1.bias": (3072,), b + "mlp.fc2.weight": (768, 3072),
                             b + "mlp.fc2.bias": (768,)})
        return keys

    for depth, cfg in ((3, vqkd_preset("official-base")),
                       (1, vqkd_preset("official-base", decoder_depth=1))):
        with torch.device("meta"):
            state = VQKD(cfg).state_dict()
        assert {k: tuple(v.shape) for k, v in state.items()} == expected(depth)
        assert config_from_state(state) == cfg
    assert cfg.num_patches == 196


def reference_codes(state: dict, cfg: VQKDConfig, x: torch.Tensor) -> torch.Tensor:
    """unilm/beit2 get_codebook_indices written out op by op (explicit softmax attention)."""
    if x.max() <= 1.0:
        x = x * 255.0
    x = x / 127.5 - 1.0
    p = "encoder."
    t = F.conv2d(x, state[p + "patch_embed.proj.weight"], state[p + "patch_embed.proj.bias"],
                 stride=cfg.patch_size).flatten(2).transpose(1, 2)
    t = torch.cat((state[p + "cls_token"].expand(t.shape[0], -1, -1), t), dim=1) + state[p + "pos_embed"]
    B, N, C = t.shape
    H = cfg.encoder_heads
    for i in range(cfg.encoder_depth):
        b = f"{p}blocks.{i}."
        ln = lambda v, n: F.layer_norm(v, (C,), state[b + n + ".weight"], state[b + n + ".bias"], 1e-6)
        h = ln(t, "norm1")
        bias = torch.cat((state[b + "attn.q_bias"], torch.zeros_like(state[b + "attn.v_bias"]),
                          state[b + "attn.v_bias"]))
        qkv = F.linear(h, state[b + "attn.qkv.weight"], bias).reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * (C // H) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        t = t + F.linear(y, state[b + "attn.proj.weight"], state[b + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(t, "norm2"), state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"]))
        t = t + F.linear(h, state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"])
    t = F.layer_norm(t[:, 1:], (C,), state[p + "fc_norm.weight"], state[p + "fc_norm.bias"], 1e-6)
    z = torch.tanh(F.linear(t, state["encode_task_layer.0.weight"], state["encode_task_layer.0.bias"]))
    z = F.normalize(F.linear(z, state["encode_task_layer.2.weight"], state["encode_task_layer.2.bias"]), dim=-1)
    z = z.reshape(-1, cfg.code_dim)
    e = state["quantize.embedding.weight"]
    d = z.pow(2).sum(dim=1, keepdim=True) + e.pow(2).sum(dim=1) - 2 * torch.einsum("bd,nd->bn", z, e)
    return torch.argmin(d, dim=1).view(B, -1)


def test_codes_follow_the_reference_computation():
    model = small_model()
    x = images(4)
    ref = reference_codes(model.official_state_dict(), model.config, x)
    assert torch.equal(model.codes(x), ref)


def test_codes_are_batch_invariant_and_deterministic():
    model = small_model()
    x = images(7)
    full = model.codes(x)
    assert torch.equal(full, model.codes(x))
    singles = torch.cat([model.codes(x[i:i + 1]) for i in range(7)])
    assert torch.equal(full, singles)
    perm = torch.tensor([6, 2, 0, 5, 1, 4, 3])
    assert torch.equal(model.codes(x[perm]), full[perm])
    mixed = torch.cat([x[:3], images(9, seed=5)])  # other images beside them change nothing
    assert torch.equal(model.codes(mixed)[:3], full[:3])


def test_codes_reduced_precision_and_channels_last():
    model = small_model()
    x = images(4)
    ref = model.codes(x)
    cl = model.codes(x, channels_last=True)
    assert cl.shape == ref.shape and (cl == ref).float().mean() > 0.95
    bf = model.codes(x, autocast_dtype=torch.bfloat16)
    assert bf.dtype == torch.long and bf.shape == ref.shape
    assert (bf == ref).float().mean() > 0.5  # bf16 encoder, float32 quantizer: mostly the same codes


def test_safetensors_roundtrip(tmp_path):
    model = small_model(decoder_depth=3)
    model.save(str(tmp_path / "tok"))
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert config["n_codes"] == 64 and config["image_size"] == 64 and config["patch_size"] == 16
    loaded = VQKD.load(str(tmp_path / "tok"))
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = images(2)
    assert torch.equal(loaded.codes(x), model.codes(x))


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match="expected 64x64 input"):
        small_model().codes(images(1, size=96))


def test_config_checks():
    with pytest.raises(ValueError, match="not a multiple"):
        VQKDConfig(image_size=100, patch_size=16)
    with pytest.raises(ValueError, match="divisible"):
        VQKDConfig(encoder_dim=100, encoder_heads=12)
    with pytest.raises(ValueError, match="unknown VQ-KD preset"):
        vqkd_preset("huge")
    tiny = vqkd_preset("tiny")
    assert (tiny.image_size, tiny.num_patches, tiny.n_codes, tiny.encoder_depth) == (96, 36, 512, 2)


def test_preprocess_is_the_beit_v2_transform():
    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    x = preprocess(square)  # shorter side already 256: no resize, centre crop only
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    expected = torch.from_numpy(np.asarray(square)[16:240, 16:240].copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(x, expected)

    wide = Image.fromarray(rng.integers(0, 256, (384, 512, 3), dtype=np.uint8))  # w=512, h=384
    resized = wide.resize((int(256 * 512 / 384), 256), Image.BICUBIC)  # torchvision truncates: 341
    left = int(round((341 - 224) / 2.0))
    crop = np.asarray(resized)[16:240, left:left + 224]
    assert torch.equal(preprocess(wide), torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 255)

    gray = Image.fromarray(rng.integers(0, 256, (96, 120), dtype=np.uint8), mode="L")
    small = preprocess(gray, image_size=96)  # demo size: shorter side to round(96*256/224) = 110
    assert small.shape == (3, 96, 96) and 0.0 <= small.min() and small.max() <= 1.0
    assert torch.equal(small[0], small[1])
    assert math.isclose(round(96 * 256 / 224), 110)
