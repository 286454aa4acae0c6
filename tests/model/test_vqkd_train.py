"""VQ-KD training: teachers, codebook maintenance, the loop, and what the codes carry."""
from __future__ import annotations

import math
import random
import time

import pytest
import torch
import torch.nn.functional as F

from model.optim import param_groups
from model.vqkd import VQKD, vqkd_preset
from model.vqkd.teachers import FrozenViTTeacher, HOGTeacher, build_teacher, norm_stats
from model.vqkd.train import (
    VQKDTrainConfig,
    code_histograms,
    code_usage,
    ema_update,
    init_codebook,
    kmeans_cosine,
    precompute_targets,
    restart_dead_codes,
    train_vqkd,
)
from model.vqkd.vit import ViT
from tests.model.clip_reference import CLIP_MEAN, CLIP_STD, OPENAI_MEAN, OPENAI_STD, random_clip

torch.set_num_threads(1)  # a second thread stalls badly on shared cores; these runs are small


def square_image(colour, size=32, box=(8, 8, 24, 24), background=(1.0, 1.0, 1.0)) -> torch.Tensor:
    x = torch.tensor(background).view(3, 1, 1).repeat(1, size, size)
    x0, y0, x1, y1 = box
    x[:, y0:y1, x0:x1] = torch.tensor(colour).view(3, 1, 1)
    return x


def test_hog_teacher_sees_edges_orientation_and_colour():
    hog = HOGTeacher(patch_size=16)
    assert hog.dim == 3 * 4 * 9
    red = square_image((1.0, 0.0, 0.0))
    blue = square_image((0.0, 0.0, 1.0))
    flat = torch.full((3, 32, 32), 0.5)
    feats, weights = hog(torch.stack([red, blue, flat]))
    assert feats.shape == (3, 4, hog.dim) and weights.shape == (3, 4)
    assert torch.allclose(feats[:2].norm(dim=-1), torch.ones(2, 4), atol=1e-4)
    assert weights[2].max() < 0.05 * weights[0].min()  # flat patches barely count (the floor)
    cos = F.cosine_similarity(feats[0], feats[1], dim=-1)
    assert cos.max() < 0.9  # same edges, other colour: jointly normalised RGB keeps them apart
    vertical = torch.zeros(1, 3, 16, 16)
    vertical[..., 8:] = 1
    horizontal = vertical.transpose(-1, -2)
    fv, _ = hog(vertical)
    fh, _ = hog(horizontal)
    assert F.cosine_similarity(fv[0, 0], fh[0, 0], dim=0) < 0.1


def test_kmeans_ema_and_restart_keep_a_unit_codebook():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    samples = F.normalize(centres.repeat(50, 1) + 0.05 * torch.randn(400, 16, generator=g), dim=1)
    found = kmeans_cosine(samples, 8, 10, g)
    assert (found @ centres.t()).max(dim=0).values.min() > 0.98  # every true centre recovered

    model = VQKD(vqkd_preset("tiny", n_codes=16, code_dim=16))
    init_codebook(model, samples, 10, g)
    assert bool(model.quantize.embedding.initted)
    idx = model.quantize.nearest(samples)
    before = model.quantize.embedding.weight.clone()
    bins = ema_update(model, samples, idx, decay=0.99)
    w = model.quantize.embedding.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(16), atol=1e-5)
    assert int(bins.sum()) == 400 and not torch.equal(w, before)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[:3] = True
    assert restart_dead_codes(model, samples, idx, dead, g) == 3
    for row in w[:3]:  # restarted rows are training vectors now
        assert (samples @ row).max() > 0.9999


def test_code_usage_and_histograms():
    codes = torch.tensor([[0, 0, 1, 2], [3, 3, 3, 3]])
    usage = code_usage(codes, 8)
    assert usage["utilisation"] == 0.5
    p = torch.tensor([2, 1, 1, 4]) / 8
    assert math.isclose(usage["perplexity"], math.exp(-(p * p.log()).sum()), rel_tol=1e-6)
    hist = code_histograms(codes, 8)
    assert hist.shape == (2, 8) and torch.allclose(hist.sum(1), torch.ones(2)) and hist[1, 3] == 1


def random_batches(n: int, size: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.stack([square_image(torch.rand(3, generator=g).tolist(), size=size,
                                       box=tuple(int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
                                       + (size // 2 + 10, size // 2 + 10)) for _ in range(n)])
    while True:
        yield images[torch.randperm(n, generator=g)[:batch]]


def test_train_loop_logs_and_codebook_after_warmup():
    model = VQKD(vqkd_preset("tiny", image_size=32, n_codes=32))
    teacher = HOGTeacher(16)
    cfg = VQKDTrainConfig(steps=12, warmup_steps=4, dead_code_steps=3, lr_warmup_steps=2)
    logs = train_vqkd(model, teacher, random_batches(24, 32, 8), cfg)
    assert [log["step"] for log in logs] == list(range(12))
    assert all(math.isfinite(log["loss"]) for log in logs)
    assert "utilisation" not in logs[3] and {"utilisation", "perplexity", "restarted"} <= set(logs[4])
    assert logs[-1]["commit_loss"] > 0 and logs[0]["commit_loss"] == 0
    assert bool(model.quantize.embedding.initted) and not model.training
    w = model.quantize.embedding.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(32), atol=1e-5)
    assert model.codes(next(random_batches(4, 32, 4))).shape == (4, 4)


def test_precomputed_teacher_targets_train_without_a_teacher():
    teacher = HOGTeacher(16)
    images = (next(random_batches(24, 32, 24)) * 255).round().to(torch.uint8)
    targets, weights = precompute_targets(teacher, images, chunk=10)
    direct, direct_w = teacher(images.float() / 255)
    assert targets.dtype == torch.float16 and targets.shape == (24, 4, teacher.dim)
    assert torch.allclose(targets.float(), direct, atol=1e-3) and torch.allclose(weights, direct_w)

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            rows = torch.randperm(24, generator=g)[:8]
            yield images[rows].float() / 255, targets[rows], weights[rows]

    model = VQKD(vqkd_preset("tiny", image_size=32, n_codes=32))
    logs = train_vqkd(model, None, batches(), VQKDTrainConfig(steps=6, warmup_steps=2, lr_warmup_steps=1))
    assert logs[-1]["rec_loss"] < logs[0]["rec_loss"] and "utilisation" in logs[-1]
    with pytest.raises(ValueError, match="need a teacher"):
        train_vqkd(model, None, random_batches(8, 32, 4), VQKDTrainConfig(steps=2, warmup_steps=1))


def timm_state(vit: ViT) -> dict:
    """Our ViT's weights in the timm / DINO layout, with a random k bias the loader must drop."""
    state = {}
    for k, v in vit.state_dict().items():
        if k.endswith("attn.q_bias"):
            prefix = k[: -len("q_bias")]
            state[prefix + "qkv.bias"] = torch.cat((v, torch.randn_like(v), vit.state_dict()[prefix + "v_bias"]))
        elif k.endswith("attn.v_bias"):
            continue
        elif k.startswith("fc_norm."):
            state["norm." + k[len("fc_norm."):]] = v
        else:
            state[k] = v
    state["head.weight"] = torch.zeros(10, vit.fc_norm.weight.shape[0])
    return state


def test_vit_teacher_from_timm_state_dict(tmp_path):
    torch.manual_seed(0)
    vit = ViT(32, 8, 3, 64, 2, 1, 4.0, 1e-6).eval()
    with torch.no_grad():
        vit.blocks[0].attn.q_bias.normal_()
    path = tmp_path / "dino.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in timm_state(vit).items()}}, path)
    teacher = FrozenViTTeacher.from_path(str(path), grid=4)
    x = torch.rand(2, 3, 32, 32)
    feats, weights = teacher(x)
    expected = vit((x - teacher.mean) / teacher.std)
    assert weights is None and teacher.dim == 64
    assert torch.allclose(feats, expected, atol=1e-5)  # the dropped k bias changes nothing
    coarse = FrozenViTTeacher.from_path(str(path), grid=2)(x)[0]  # other grid: resampled
    assert coarse.shape == (2, 4, 64)


class PatchTokens(torch.nn.Module):  # any network returning (B, 1 + N, D) tokens
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 24, 8, 8)

    def forward(self, x):
        t = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat((t.mean(1, keepdim=True), t), dim=1)


@pytest.mark.parametrize("fmt", ["export", "torchscript"])
def test_vit_teacher_from_a_whole_network_trains(tmp_path, fmt):
    net, example = PatchTokens().eval(), torch.rand(2, 3, 32, 32)
    path = tmp_path / "teacher.pt2"
    if fmt == "export":
        program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, str(path))
    else:
        torch.jit.save(torch.jit.script(net), str(path))
    teacher = build_teacher("vit", grid=2, patch_size=16, checkpoint=str(path), input_size=32)
    assert teacher.dim == 24
    x = torch.rand(3, 3, 32, 32)
    feats, _ = teacher(x)
    expected = net((x - teacher.mean) / teacher.std)[:, 1:]  # cls token dropped, 4x4 -> 2x2 grid
    assert feats.shape == (3, 4, 24)
    assert torch.allclose(feats, F.avg_pool2d(expected.transpose(1, 2).reshape(3, 24, 4, 4), 2)
                          .flatten(2).transpose(1, 2), atol=1e-5)
    model = VQKD(vqkd_preset("tiny", image_size=32, n_codes=16, out_dim=24))
    logs = train_vqkd(model, teacher, random_batches(8, 32, 4),
                      VQKDTrainConfig(steps=4, warmup_steps=2, lr_warmup_steps=1))
    assert len(logs) == 4 and math.isfinite(logs[-1]["loss"])
    with pytest.raises(ValueError, match="teacher dim"):
        train_vqkd(VQKD(vqkd_preset("tiny", image_size=32)), teacher, random_batches(8, 32, 4),
                   VQKDTrainConfig(steps=2, warmup_steps=1))


@pytest.mark.parametrize("layout", ["visual", "full_clip", "torchscript"])
def test_clip_teacher_loads_the_openai_layout(tmp_path, layout):
    clip = random_clip()
    path = tmp_path / "clip.pt"
    if layout == "visual":  # the image tower's own state dict
        torch.save(clip.visual.state_dict(), path)
    elif layout == "full_clip":  # a whole CLIP model's weights
        torch.save({"state_dict": clip.state_dict()}, path)
    else:  # how OpenAI releases CLIP: a TorchScript archive of the whole model
        torch.jit.save(torch.jit.trace(clip, torch.rand(1, 3, 32, 32)), str(path))
    teacher = build_teacher("clip", grid=4, patch_size=8, checkpoint=str(path))
    x = torch.rand(3, 3, 32, 32)
    feats, weights = teacher(x)
    with torch.no_grad():
        expected = clip.visual((x - CLIP_MEAN) / CLIP_STD)  # OpenAI statistics by default
    assert weights is None and teacher.dim == 24 and feats.shape == (3, 16, 24)
    assert torch.allclose(feats, expected, atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_clip_teacher_applies_the_chosen_normalisation(tmp_path):
    clip = random_clip()
    torch.save(clip.visual.state_dict(), tmp_path / "clip.pt")
    x = torch.rand(2, 3, 32, 32)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    for norm, (m, s) in (("imagenet", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
                         ((mean, std), (mean, std))):
        teacher = build_teacher("clip", grid=4, patch_size=8, checkpoint=str(tmp_path / "clip.pt"), norm=norm)
        with torch.no_grad():
            expected = clip.visual((x - torch.tensor(m).view(1, 3, 1, 1)) / torch.tensor(s).view(1, 3, 1, 1))
        assert torch.allclose(teacher(x)[0], expected, atol=1e-5, rtol=1e-4)
    coarse = build_teacher("clip", grid=2, patch_size=16, checkpoint=str(tmp_path / "clip.pt"))
    assert coarse(x)[0].shape == (2, 4, 24)  # other tokenizer grid: resampled


def test_teacher_normalisation_by_name_or_values(tmp_path):
    assert norm_stats("openai_clip") == (OPENAI_MEAN, OPENAI_STD)
    assert norm_stats(([0.5] * 3, [0.25] * 3)) == ((0.5,) * 3, (0.25,) * 3)
    for bad in ("openai", ([0.5] * 3, [0.0, 1.0, 1.0]), ([0.5] * 2, [1.0] * 2)):
        with pytest.raises(ValueError, match="normalisation"):
            norm_stats(bad)
    torch.manual_seed(0)
    torch.save(timm_state(ViT(32, 8, 3, 64, 1, 1, 4.0, 1e-6)), tmp_path / "vit.pth")
    vit = build_teacher("vit", grid=4, patch_size=8, checkpoint=str(tmp_path / "vit.pth"))
    assert torch.allclose(vit.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))  # vit's default
    vit = build_teacher("vit", grid=4, patch_size=8, checkpoint=str(tmp_path / "vit.pth"), norm="openai_clip")
    assert torch.equal(vit.mean, CLIP_MEAN) and torch.equal(vit.std, CLIP_STD)
    with pytest.raises(ValueError, match="raw pixels"):
        build_teacher("hog", grid=4, patch_size=8, norm="imagenet")
    with pytest.raises(ValueError, match="not an OpenAI CLIP"):
        build_teacher("clip", grid=4, patch_size=8, checkpoint=str(tmp_path / "vit.pth"))


def test_weight_decay_groups_follow_the_reference():
    """optim_factory.get_parameter_groups with VQKD.no_weight_decay(): no decay on 1-D
    parameters, biases and the encoder/decoder cls_token and pos_embed; the EMA codebook
    has no gradient and is in no group."""
    model = VQKD(vqkd_preset("tiny", image_size=32))
    skip = {"encoder.cls_token", "encoder.pos_embed", "decoder.cls_token", "decoder.pos_embed"}
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    got_decay = {names[id(p)] for p in decay["params"]}
    got_no_decay = {names[id(p)] for p in no_decay["params"]}
    expected_no_decay = {n for n, p in model.named_parameters()
                         if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias") or n in skip)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert got_no_decay == expected_no_decay and skip <= got_no_decay
    assert {"encoder.blocks.0.attn.q_bias", "encoder.fc_norm.weight"} <= got_no_decay
    assert got_decay == {n for n, p in model.named_parameters() if p.requires_grad} - expected_no_decay
    assert "encoder.blocks.0.attn.qkv.weight" in got_decay and "quantize.embedding.weight" not in got_decay


def demo_scenes(n: int, seed: int, num_objects=None):
    from model.images import preprocess
    from pipelines.demo_data import render_scene

    rng = random.Random(seed)
    xs, shapes = [], []
    for _ in range(n):
        image, labels, _ = render_scene(rng, 96, num_objects)
        xs.append(preprocess(image, 96))
        shapes.append(labels["shape"])
    names = sorted(set(shapes))
    return torch.stack(xs), torch.tensor([names.index(s) for s in shapes])


@pytest.mark.slow
def test_tiny_hog_tokenizer_learns_a_used_codebook_that_carries_shape():
    """The demo recipe, shortened (200 of 600 steps at half the batch): >= half the
    codebook used on held-out scenes, and a linear probe on per-image code histograms
    far above chance on the shape of single-object scenes (the demo's probe set)."""
    from pipelines.common.linear_probe import linear_probe

    train_x, _ = demo_scenes(1200, seed=0)
    hold_x, _ = demo_scenes(300, seed=1)
    probe_x, probe_y = demo_scenes(1500, seed=2, num_objects=1)
    teacher = HOGTeacher(16)
    torch.manual_seed(0)
    model = VQKD(vqkd_preset("tiny", out_dim=teacher.dim))
    targets, weights = precompute_targets(teacher, train_x)  # as the stage does
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            perm = torch.randperm(len(train_x), generator=g)
            for i in range(0, len(perm) - 31, 32):
                rows = perm[i:i + 32]
                yield train_x[rows], targets[rows], weights[rows]

    start = time.perf_counter()
    logs = train_vqkd(model, None, batches(), VQKDTrainConfig(steps=200, warmup_steps=60))
    print(f"trained 200 steps in {time.perf_counter() - start:.0f} s")
    usage = code_usage(model.codes(hold_x), model.config.n_codes)
    hist = code_histograms(model.codes(probe_x), model.config.n_codes)
    probe = linear_probe(hist[:1000], probe_y[:1000], hist[1000:], probe_y[1000:], 3, steps=300, lr=0.01, weight_decay=1e-4, seed=0)
    chance = float(torch.bincount(probe_y[1000:]).max()) / 500
    print(f"held-out utilisation {usage['utilisation']:.3f}, perplexity {usage['perplexity']:.0f}, "
          f"probe {probe['top1']:.3f} (chance {chance:.3f}), final loss {logs[-1]['rec_loss']:.3f}")
    assert logs[-1]["rec_loss"] < 0.5 * logs[0]["rec_loss"]
    assert usage["utilisation"] >= 0.5
    assert probe["top1"] >= chance + 0.25
