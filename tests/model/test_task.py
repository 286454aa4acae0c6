"""The masked-data-modeling task on a tiny real backbone: masking, heads, losses, training."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from model.batch import ImagePart, MixedBatch, PairPart, TextPart
from model.beit3 import BEiT3
from model.config import beit3_preset
from model.heads import MaskedPredictionHead, PretrainHeads
from model.task import PART_KEYS, Masker, MaskingConfig, PretrainMasks, PretrainTask

torch.set_num_threads(2)

TEXT_VOCAB, VISUAL_VOCAB, SPECIALS, MASK_ID, PAD = 120, 32, (0, 1, 2, 3), 4, 1


def tiny_config():
    # 96 px, patch 16 -> a 6x6 grid (the demo's shape), 2 thin layers to stay fast
    return beit3_preset("tiny", vocab_size=TEXT_VOCAB, depth=2, dim=64, num_heads=2, ffn_dim=128)


def make_task(masking=MaskingConfig(), seed=0) -> PretrainTask:
    torch.manual_seed(seed)
    return PretrainTask(BEiT3(tiny_config()), TEXT_VOCAB, VISUAL_VOCAB, masking, SPECIALS, mask_id=MASK_ID)


def texts(batch, length, g):
    ids = torch.randint(5, TEXT_VOCAB, (batch, length), generator=g)
    lengths = torch.randint(4, length + 1, (batch,), generator=g)
    lengths[0] = length
    padding = torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)
    ids[:, 0] = 0
    ids[torch.arange(batch), lengths - 1] = 2
    return ids.masked_fill(padding, PAD), padding


def images(batch, g):
    pixels = torch.rand(batch, 3, 96, 96, generator=g) * 2 - 1
    return pixels, torch.randint(0, VISUAL_VOCAB, (batch, 36), generator=g)


def make_batch(seed=0, parts=("text", "image", "pair"), batch=4) -> MixedBatch:
    g = torch.Generator().manual_seed(seed)
    out = {}
    if "text" in parts:
        out["text"] = TextPart(*texts(batch, 16, g))
    if "image" in parts:
        out["image"] = ImagePart(*images(batch, g))
    if "pair" in parts:
        out["pair"] = PairPart(*images(batch, g), *texts(batch, 10, g))
    return MixedBatch(**out)


def test_reports_each_part_loss_accuracy_and_count():
    task, batch = make_task(), make_batch()
    out = task(batch, generator=3)
    masks = task.masker(batch, generator=3)
    assert set(out.losses) == set(out.accuracies) == set(out.counts) == set(PART_KEYS)
    assert int(out.counts["text_mlm"]) == int(masks.text.selected.sum())
    assert int(out.counts["pair_mlm"]) == int(masks.pair_text.selected.sum())
    assert int(out.counts["image_mim"]) == int(out.counts["pair_mim"]) == 4 * 14  # 40% of 6x6, per image
    assert torch.allclose(out.loss, torch.stack(list(out.losses.values())).mean())
    for key in PART_KEYS:
        assert 0.0 <= float(out.accuracies[key]) <= 1.0
        assert not out.losses[key].requires_grad
    # an untrained model is near chance: ln(vocab)
    assert abs(float(out.losses["image_mim"]) - torch.log(torch.tensor(VISUAL_VOCAB)).item()) < 0.5
    assert out.loss.requires_grad


def test_heads_project_only_masked_positions():
    task, batch = make_task(), make_batch()
    seen = []
    hooks = [head.proj.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
             for head in (task.heads.text, task.heads.image)]
    out = task(batch, generator=1)
    for hook in hooks:
        hook.remove()
    # rows entering each projection = masked positions of that part (order: text, image, pair)
    assert [s[0] for s in seen] == [int(out.counts[k]) for k in PART_KEYS]
    assert all(s[1] == 64 for s in seen)


def test_head_gradient_reaches_masked_positions_only():
    head = MaskedPredictionHead(8, 11)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    positions = torch.zeros(3, 5, dtype=torch.bool)
    positions[0, 1] = positions[2, 4] = positions[2, 0] = True
    logits = head(hidden, positions)
    assert logits.shape == (3, 11)
    logits.logsumexp(-1).sum().backward()
    touched = hidden.grad.abs().sum(-1) > 0
    assert torch.equal(touched, positions)


def test_masked_patches_are_hidden_from_the_backbone():
    task, batch = make_task(), make_batch(parts=("image",))
    task.eval()
    masks = task.masker(batch, generator=0)
    grid = masks.image.view(4, 6, 6)

    def perturb(where):  # add noise to the pixels of one patch of image 0
        pixels = batch.image.pixels.clone()
        r, c = where
        pixels[0, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] += 0.5
        return MixedBatch(image=ImagePart(pixels, batch.image.visual_tokens))
    masked = grid[0].nonzero()[0].tolist()
    visible = (~grid[0]).nonzero()[0].tolist()
    with torch.no_grad():
        base = task(batch, masks=masks).losses["image_mim"]
        assert torch.equal(task(perturb(masked), masks=masks).losses["image_mim"], base)
        assert not torch.equal(task(perturb(visible), masks=masks).losses["image_mim"], base)


def test_a_few_training_steps_reduce_every_loss():
    task, batch = make_task(), make_batch(seed=1)
    optimizer = torch.optim.AdamW(task.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        out = task(batch, generator=0)  # the same masks every step: a fixed problem to fit
        first = first or out
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.loss.item() < 0.6 * first.loss.item()
    for key in PART_KEYS:
        assert float(out.losses[key]) < float(first.losses[key]), key


@pytest.mark.parametrize("parts,masking,keys", [
    (("image",), MaskingConfig(), {"image_mim"}),
    (("text",), MaskingConfig(), {"text_mlm"}),
    (("text", "pair"), MaskingConfig(pair_image_ratio=0.0), {"text_mlm", "pair_mlm"}),
    (("pair",), MaskingConfig(), {"pair_mlm", "pair_mim"}),
])
def test_batches_with_only_some_parts(parts, masking, keys):
    task = make_task(masking)
    out = task(make_batch(parts=parts), generator=0)
    assert set(out.losses) == set(out.counts) == keys
    out.loss.backward()
    assert task.heads.text.proj.weight.grad is not None or "text_mlm" not in keys


def test_precomputed_masks_from_a_loader_side_masker_give_the_same_result():
    task, batch = make_task(), make_batch()
    # what a data loader worker would build, without the model
    masker = Masker(MaskingConfig(), TEXT_VOCAB, SPECIALS, MASK_ID, patch_size=16)
    inside = task(batch, generator=9)
    outside = task(batch, masks=masker(batch, generator=9))
    assert torch.equal(inside.loss, outside.loss)
    again = task(batch, generator=9)
    other = task(batch, generator=10)
    assert torch.equal(inside.loss, again.loss) and not torch.equal(inside.loss, other.loss)


def test_a_part_with_nothing_to_mask_is_counted_but_not_scored():
    task = make_task()
    only_specials = torch.tensor([[0, 2, PAD], [0, 3, 2]])
    g = torch.Generator().manual_seed(0)
    batch = MixedBatch(text=TextPart(only_specials, only_specials == PAD), image=ImagePart(*images(2, g)))
    out = task(batch, generator=0)
    assert int(out.counts["text_mlm"]) == 0 and "text_mlm" not in out.losses
    assert torch.allclose(out.loss, out.losses["image_mim"])


def test_bf16_autocast_on_cpu():
    task, batch = make_task(), make_batch()
    reference = task(batch, generator=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = task(batch, generator=0)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert abs(out.loss.item() - reference.loss.item()) < 0.1
    out.loss.backward()
    assert torch.isfinite(task.heads.image.proj.weight.grad).all()


def test_configuration_and_mask_errors():
    with pytest.raises(ValueError, match="text_ratio"):
        MaskingConfig(text_ratio=0.0)
    with pytest.raises(ValueError, match="pair_image_ratio"):
        MaskingConfig(pair_image_ratio=1.0)
    with pytest.raises(ValueError, match="exceeds"):
        PretrainTask(BEiT3(tiny_config()), TEXT_VOCAB + 1, VISUAL_VOCAB, MaskingConfig(), SPECIALS, mask_id=MASK_ID)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Masker(MaskingConfig(), TEXT_VOCAB, SPECIALS, TEXT_VOCAB, patch_size=16)
    task, batch = make_task(), make_batch(parts=("image", "pair"))
    masks = task.masker(batch, generator=0)
    with pytest.raises(ValueError, match="masks.image"):
        task(batch, masks=dataclasses.replace(masks, image=masks.image[:, :10]))
    with pytest.raises(ValueError, match="masks.pair_text is None"):
        task(batch, masks=PretrainMasks(image=masks.image))
    with pytest.raises(ValueError, match="per-sample generators go to Masker.text"):
        task(batch, generator=[torch.Generator()] * 4)


def test_head_parameter_counts_match_the_reference_totals():
    """Backbone + both heads: base 276.4M, large 746.6M (issue 2); built on the meta device."""
    with torch.device("meta"):
        for name, total in (("base", 276.4e6), ("large", 746.6e6)):
            config = beit3_preset(name)
            params = sum(p.numel() for p in BEiT3(config).parameters())
            params += sum(p.numel() for p in PretrainHeads(config.dim, 64010, 8192).parameters())
            assert abs(params - total) < 0.05e6, (name, params)
