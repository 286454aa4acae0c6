"""The backbone on the CPU: shapes, routing, padding, the paper variant, speed options, sizes."""
from __future__ import annotations

import math

import pytest
import torch

from model.beit3 import BEiT3
from model.config import beit3_preset
from model.multiway import Multiway

torch.set_num_threads(2)
VOCAB = 300


def tiny(**overrides):
    """The tiny preset's geometry (96 px, 6x6 patches) at test-sized width and depth."""
    torch.manual_seed(0)
    fields = dict(dim=64, num_heads=4, ffn_dim=128, depth=2, vocab_size=VOCAB)
    return BEiT3(beit3_preset("tiny", **{**fields, **overrides}))


def batch(model, b=3, length=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    image = torch.rand(b, 3, size, size, generator=gen) * 2 - 1
    text = torch.randint(3, VOCAB, (b, length), generator=gen)
    padding = torch.arange(length)[None, :] >= torch.tensor([length, 5, 2][:b])[:, None]
    return image, text.masked_fill(padding, 1), padding


def test_output_shapes_and_order():
    model = tiny().eval()
    image, text, padding = batch(model)
    n, d = model.num_patches, model.config.dim
    assert n == 36
    with torch.no_grad():
        assert model.encode(image=image).shape == (3, 1 + n, d)
        assert model.encode(text=text, text_padding_mask=padding).shape == (3, 8, d)
        pair = model.encode(image=image, text=text, text_padding_mask=padding)
        assert pair.shape == (3, 1 + n + 8, d)
        assert torch.equal(model(image, text, padding), pair)


def test_padding_is_invisible_to_real_tokens():
    """Real-token outputs do not depend on what or how much padding follows them."""
    model = tiny().eval()
    image, text, padding = batch(model)
    longer = torch.cat([text, torch.randint(3, VOCAB, (3, 4))], 1)  # junk ids in the padding
    longer_pad = torch.cat([padding, torch.ones(3, 4, dtype=torch.bool)], 1)
    with torch.no_grad():
        for img in (None, image):
            a = model.encode(image=img, text=text, text_padding_mask=padding)
            b = model.encode(image=img, text=longer, text_padding_mask=longer_pad)[:, :a.shape[1]]
            keep = torch.cat([torch.ones(3, a.shape[1] - 8, dtype=torch.bool), ~padding], 1)
            torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-5)
            # a sample alone, unpadded, gives its padded-batch result
            alone = model.encode(image=None if img is None else img[1:2], text=text[1:2, :5])
            torch.testing.assert_close(alone[0], a[1, :alone.shape[1]], atol=1e-5, rtol=1e-5)


def test_image_mask_replaces_patches_by_the_mask_token():
    model = tiny().eval()
    image, _, _ = batch(model)
    mask = torch.zeros(3, model.num_patches, dtype=torch.bool)
    mask[:, :5] = True
    with torch.no_grad():
        embedded = model.vision_embed(image, mask)
        plain = model.vision_embed(image)
    token = model.vision_embed.mask_token[0, 0]
    assert torch.equal(embedded[:, 1:6], token.expand(3, 5, -1))
    assert torch.equal(embedded[:, 6:], plain[:, 6:])
    assert torch.equal(embedded[:, 0], plain[:, 0])  # cls untouched


def test_experts_are_chosen_by_the_input_modalities():
    """Image-only never touches text experts, text-only never touches vision experts."""
    for kind in ("image", "text", "pair"):
        model = tiny()
        image, text, padding = batch(model)
        args = {"image": dict(image=image), "text": dict(text=text, text_padding_mask=padding),
                "pair": dict(image=image, text=text, text_padding_mask=padding)}[kind]
        model.encode(**args).sum().backward()
        vision = [p.grad for n, p in model.named_parameters() if ".vision." in n]
        text_g = [p.grad for n, p in model.named_parameters() if ".text." in n]
        assert all(g is None for g in vision) == (kind == "text")
        assert all(g is None for g in text_g) == (kind == "image")
        assert all(g is not None for g in (vision if kind != "text" else text_g))


def test_split_is_an_argument_not_state():
    """Interleaved calls of different modalities give what fresh calls give."""
    model = tiny().eval()
    image, text, padding = batch(model)
    with torch.no_grad():
        first = model.encode(image=image)
        model.encode(text=text, text_padding_mask=padding)
        model.encode(image=image, text=text, text_padding_mask=padding)
        assert torch.equal(model.encode(image=image), first)
    assert not any(hasattr(m, "split_position") for m in model.modules())


def test_paper_variant_structure():
    model = tiny(variant="paper", depth=4)
    assert model.config.vl_expert_layers == 1
    assert all(not isinstance(layer.attn.qkv, Multiway) for layer in model.layers)  # shared
    assert [layer.ffn.vl is not None for layer in model.layers] == [False, False, False, True]


@pytest.mark.parametrize("kind", ["image", "text", "pair"])
def test_paper_vl_expert_learns_from_pairs_only(kind):
    model = tiny(variant="paper", depth=4, vl_expert_layers=2)
    image, text, padding = batch(model)
    args = {"image": dict(image=image), "text": dict(text=text, text_padding_mask=padding),
            "pair": dict(image=image, text=text, text_padding_mask=padding)}[kind]
    model.encode(**args).pow(2).mean().backward()
    vl = [p.grad for n, p in model.named_parameters() if ".ffn.vl." in n]
    assert len(vl) == 2 * 8  # two layers x (LN, fc1, ffn LN, fc2) x (weight, bias)
    if kind == "pair":
        assert all(g is not None and g.abs().sum() > 0 for g in vl)
        # in the top layers the modality experts sit idle for pairs
        top = [p.grad for n, p in model.named_parameters()
               if n.startswith(("layers.2.ffn.vision", "layers.3.ffn.text"))]
        assert top and all(g is None for g in top)
    else:
        assert all(g is None for g in vl)
    shared = [p.grad for n, p in model.named_parameters() if ".attn." in n]
    assert all(g is not None for g in shared)  # attention is shared by every modality


def test_paper_vl_expert_is_never_used_for_single_modalities():
    model = tiny(variant="paper").eval()
    image, text, padding = batch(model)
    with torch.no_grad():
        before = [model.encode(image=image), model.encode(text=text, text_padding_mask=padding),
                  model.encode(image=image, text=text, text_padding_mask=padding)]
        for p in model.layers[-1].ffn.vl.parameters():
            p.add_(1.0)
        after = [model.encode(image=image), model.encode(text=text, text_padding_mask=padding),
                 model.encode(image=image, text=text, text_padding_mask=padding)]
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert not torch.allclose(before[2], after[2])


def _loss_and_grads(model, image, text, padding):
    torch.manual_seed(123)  # same drop-path draws in both runs
    out = model.encode(image=image, text=text, text_padding_mask=padding)
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_same_outputs_and_grads():
    plain = tiny(drop_path=0.2).train()
    checkpointed = tiny(drop_path=0.2, checkpoint_activations=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    image, text, padding = batch(plain)
    out_a, grads_a = _loss_and_grads(plain, image, text, padding)
    out_b, grads_b = _loss_and_grads(checkpointed, image, text, padding)
    torch.testing.assert_close(out_a, out_b, atol=0, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-7, rtol=1e-6, msg=name)


def test_drop_path_only_in_training():
    model = tiny(drop_path=0.5)
    image, text, padding = batch(model)
    with torch.no_grad():
        model.eval()
        a = model.encode(image=image, text=text, text_padding_mask=padding)
        b = model.encode(image=image, text=text, text_padding_mask=padding)
        model.train()
        c = model.encode(image=image, text=text, text_padding_mask=padding)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_bf16_autocast_runs_close_to_float32():
    model = tiny()
    image, text, padding = batch(model)
    keep = torch.cat([torch.ones(3, 1 + model.num_patches, dtype=torch.bool), ~padding], 1)
    reference = model.encode(image=image, text=text, text_padding_mask=padding).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.encode(image=image, text=text, text_padding_mask=padding)
    out.float().pow(2).mean().backward()
    assert torch.isfinite(out[keep]).all()
    assert (out.float() - reference)[keep].abs().max() < 0.15  # LN-normalised outputs of size ~1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_torch_compile_traces_the_whole_model_without_breaks():
    """fullgraph=True fails on any graph break; aot_eager keeps it fast on CPU."""
    model = tiny()
    image, text, padding = batch(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(image, text, padding)
    out.pow(2).mean().backward()
    torch.testing.assert_close(out, model(image, text, padding), atol=1e-5, rtol=1e-5)
    assert model.layers[0].attn.qkv.vision.proj.weight.grad is not None


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    model = tiny(depth=1).eval()
    image, text, padding = batch(model)
    with torch.no_grad():
        out = torch.compile(model)(image, text, padding)
        torch.testing.assert_close(out, model(image, text, padding), atol=1e-4, rtol=1e-4)


def test_bad_inputs_are_clear_errors():
    model = tiny().eval()
    image, text, padding = batch(model)
    cases = [
        (dict(), "needs an image"),
        (dict(image=image[:, :, :64, :64]), "expects 96x96"),
        (dict(text=text, image_mask=torch.zeros(3, 36, dtype=torch.bool)), "without an image"),
        (dict(image=image, image_mask=torch.zeros(3, 35, dtype=torch.bool)), "image_mask"),
        (dict(text=text, text_padding_mask=padding.long()), "text_padding_mask"),
        (dict(image=image, text_padding_mask=padding), "without text"),
        (dict(image=image[:2], text=text), "batch"),
        (dict(text=torch.ones(1, 1023, dtype=torch.long)), "at most 1022"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model.encode(**kwargs)


def _count(name, variant="released"):
    with torch.device("meta"):
        model = BEiT3(beit3_preset(name, variant))
    return model, sum(p.numel() for p in model.parameters())


def _pretraining_heads(dim):
    """The head layout the counts in the paper/DESIGN imply: bias-free Linear layers."""
    return dim * 64010 + dim * 8192  # text head over the vocabulary + image head over the codebook


@pytest.mark.parametrize("name, backbone, with_heads", [("base", 221.0, 276.4), ("large", 672.7, 746.6)])
def test_released_parameter_counts(name, backbone, with_heads):
    model, count = _count(name)
    assert all(p.is_meta for p in model.parameters())  # no memory used
    assert abs(count / 1e6 - backbone) <= 0.1
    assert abs((count + _pretraining_heads(model.config.dim)) / 1e6 - with_heads) <= 0.1


def test_paper_giant_parameter_count_matches_the_paper_breakdown():
    """BEiT-3 paper, Table 1: V-FFN 692M, L-FFN 692M, VL-FFN 52M, shared attention 317M, 1.9B."""
    model, count = _count("giant", "paper")

    def millions(part):  # the paper's figures count the weight matrices (no biases, no LNs)
        return sum(p.numel() for n, p in model.named_parameters() if part in n and p.dim() == 2) / 1e6

    assert millions(".ffn.vision.") == pytest.approx(692, rel=2e-3)
    assert millions(".ffn.text.") == pytest.approx(692, rel=2e-3)
    assert millions(".ffn.vl.") == pytest.approx(52, rel=2e-3)
    assert millions(".attn.") == pytest.approx(317, rel=2e-3)
    assert 1.8e9 < count < 1.95e9


def test_fresh_weights_follow_the_init_recipe():
    model = tiny(dim=128, depth=4, vocab_size=4000)
    table = model.text_embed.weight
    assert table.abs().max() <= 0.04 and 0.016 < table.std() < 0.019  # N(0, .02) cut at 2 std
    gain = math.sqrt(math.log(2 * 4))  # Magneto sub-LN scaling of fc1, fc2, out_proj, v_proj
    qkv = model.layers[0].attn.qkv.text.proj.weight
    q_std, v_std = qkv[:128].std().item(), qkv[256:].std().item()
    assert v_std / q_std == pytest.approx(gain, rel=0.05)
    norm = model.layers[0].ffn.vision.norm
    assert torch.equal(norm.weight, torch.ones(128)) and torch.equal(norm.bias, torch.zeros(128))
