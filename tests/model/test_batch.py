"""MixedBatch parts, the collate step from shard rows, and image bytes -> model input."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.batch import ImagePart, MixedBatch, PairPart, TextPart, collate_rows, pad_texts
from model.images import to_model_input

PAD = 1


def encoded(colour, size=32, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format=fmt)
    return buf.getvalue()


def rows():
    return [
        {"id": "t1", "modality": "text", "text_ids": [0, 10, 11, 2], "image": None, "visual_tokens": None},
        {"id": "p1", "modality": "pair", "text_ids": [0, 20, 2], "image": encoded((255, 0, 128)),
         "visual_tokens": list(range(4))},
        {"id": "i1", "modality": "image", "text_ids": None, "image": encoded((0, 0, 0)), "visual_tokens": [5, 6, 7, 8]},
        {"id": "t2", "modality": "text", "text_ids": [0, 12, 2], "image": None, "visual_tokens": None},
        {"id": "p2", "modality": "pair", "text_ids": [0, 21, 22, 23, 24, 2], "image": encoded((255, 255, 255)),
         "visual_tokens": [3, 2, 1, 0]},
    ]


def test_to_model_input_is_the_official_normalisation():
    x = to_model_input(encoded((255, 0, 128)))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, (128 / 255 - 0.5) / 0.5]), atol=1e-6)
    jpeg = to_model_input(encoded((255, 255, 255), fmt="JPEG"))
    assert jpeg.shape == (3, 32, 32) and jpeg.max() <= 1.0 and jpeg.min() >= -1.0


def test_to_model_input_matches_numpy_reference_on_a_random_image():
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    expected = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.allclose(to_model_input(buf.getvalue()), expected, atol=1e-6)


def test_to_model_input_errors():
    with pytest.raises(ValueError, match="cannot decode"):
        to_model_input(b"not an image")
    with pytest.raises(ValueError, match="expected 64x64"):
        to_model_input(encoded((0, 0, 0)), image_size=64)


def test_collate_groups_by_modality_and_pads_to_the_longest():
    batch = collate_rows(rows(), pad_id=PAD)
    assert list(batch.parts) == ["text", "image", "pair"] and batch.num_samples == 5
    assert batch.text.ids.tolist() == [[0, 10, 11, 2], [0, 12, 2, PAD]]
    assert batch.text.padding_mask.tolist() == [[False] * 4, [False, False, False, True]]
    pair = batch.pair
    assert pair.ids.shape == (2, 6) and pair.ids[0].tolist() == [0, 20, 2, PAD, PAD, PAD]
    assert pair.padding_mask.sum(1).tolist() == [3, 0]
    assert pair.pixels.shape == (2, 3, 32, 32) and pair.visual_tokens.tolist() == [[0, 1, 2, 3], [3, 2, 1, 0]]
    assert pair.pixels[1].eq(1.0).all()  # white, in order
    assert batch.image.pixels.eq(-1.0).all() and batch.image.visual_tokens.dtype == torch.long


def test_collate_with_only_some_modalities():
    batch = collate_rows([r for r in rows() if r["modality"] == "image"], pad_id=PAD)
    assert batch.text is None and batch.pair is None and batch.image.batch_size == 1


@pytest.mark.parametrize("change,message", [
    ({"modality": "video"}, "unknown modality 'video'"),
    ({"visual_tokens": None}, "'visual_tokens' is empty"),
    ({"text_ids": []}, "'text_ids' is empty"),
    ({"visual_tokens": [1, -3, 2, 0]}, "negative visual token"),
    ({"image": encoded((0, 0, 0), size=16)}, "differ from"),
])
def test_collate_rejects_bad_rows_naming_them(change, message):
    bad = rows()
    bad[4] = {**bad[4], **change}
    with pytest.raises(ValueError, match=message) as info:
        collate_rows(bad, pad_id=PAD)
    assert "p2" in str(info.value)


def test_parts_validate_shapes_and_move():
    ids, pad = pad_texts([[0, 5, 2], [0, 2]], PAD)
    assert ids.tolist() == [[0, 5, 2], [0, 2, PAD]]
    with pytest.raises(ValueError, match="int64"):
        TextPart(ids.int(), pad)
    with pytest.raises(ValueError, match="bool"):
        TextPart(ids, pad.long())
    with pytest.raises(ValueError, match="visual_tokens"):
        ImagePart(torch.zeros(2, 3, 8, 8), torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        PairPart(torch.zeros(2, 3, 8, 8), torch.zeros(2, 4, dtype=torch.long), ids[:1], pad[:1])
    with pytest.raises(ValueError, match="at least one part"):
        MixedBatch()
    batch = MixedBatch(text=TextPart(ids, pad)).to("cpu")
    assert torch.equal(batch.text.ids, ids) and batch.image is None
