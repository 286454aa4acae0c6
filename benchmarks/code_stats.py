"""How predictable are a shard set's visual tokens? The figures behind RESULTS.md, "Demo pretraining".

    python -m benchmarks.code_stats --shards data/shards [--split train] [--max-images 4000]

For the image and pair rows of the packed shards: the codes' perplexity (exp entropy of the
marginal, what a model that ignores its input can reach), the same for the flat patches alone
(pixel std below --flat-std: background and object interiors), and the same-image mode
accuracy: each patch predicted as the most common code among the other patches of its image.
A tokenizer whose mode accuracy is near 1 / perplexity gives masked image modeling little to
learn from context.
"""
from __future__ import annotations

import argparse
import io
import json

import numpy as np
from PIL import Image

from pipelines.common.shards import ShardRowReader, split_index


def perplexity(codes: np.ndarray) -> float:
    counts = np.bincount(codes.ravel())
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def same_image_mode_accuracy(codes: np.ndarray) -> float:
    """codes (M, N): share of patches equal to the most common code of the image's other N - 1."""
    hits = 0
    for row in codes:
        values, counts = np.unique(row, return_counts=True)
        for k, code in enumerate(row):
            left = counts - (values == code)  # the counts without patch k itself
            hits += values[left.argmax()] == code
    return hits / codes.size


def flat_patches(image_bytes: list[bytes], grid: int, flat_std: float) -> np.ndarray:
    """(M, grid * grid) bool: the patch's pixel standard deviation (0-255 scale) below flat_std."""
    out = []
    for data in image_bytes:
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
        side = pixels.shape[0] // grid
        patches = pixels[:grid * side, :grid * side].reshape(grid, side, grid, side, 3).transpose(0, 2, 1, 3, 4)
        out.append(patches.reshape(grid * grid, -1).std(axis=1) < flat_std)
    return np.stack(out)


def code_stats(shards: str, split: str = "train", max_images: int = 4000, flat_std: float = 6.0) -> dict:
    index = split_index(shards, split)
    tokens, images = [], []
    for modality in ("image", "pair"):
        reader = ShardRowReader(index, modality, cache_size=1)
        for shard in range(len(index.paths)):
            for row in reader.rows_of(shard):
                if len(tokens) < max_images:
                    tokens.append(row["visual_tokens"])
                    images.append(row["image"])
    codes = np.asarray(tokens, dtype=np.int64)  # (M, N)
    grid = int(round(codes.shape[1] ** 0.5))
    flat = flat_patches(images, grid, flat_std)
    return {"images": len(codes), "patches_per_image": codes.shape[1], "codes_used": int(np.unique(codes).size),
            "perplexity": round(perplexity(codes), 2), "flat_share": round(float(flat.mean()), 3),
            "flat_perplexity": round(perplexity(codes[flat]), 2),
            "same_image_mode_accuracy": round(same_image_mode_accuracy(codes), 4)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="data/shards")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-images", type=int, default=4000)
    parser.add_argument("--flat-std", type=float, default=6.0)
    args = parser.parse_args(argv)
    result = code_stats(args.shards, args.split, args.max_images, args.flat_std)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
