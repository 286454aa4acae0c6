"""Storage per image and per view of ``tokenize.views_per_image`` (RESULTS.md).

    python -m benchmarks.view_storage [--images 50] [--size 96] [--patch 16] [--views 3]

Demo-like inputs (pipelines.demo_data scenes at 96 px, half JPEG q90, half PNG, as the
demo's image folder), each turned into what tokenize stores: view 0 the centre crop
(model.images.preprocess) and views 1..K-1 (pipelines.common.augment, BEiT v2's transform,
default params), each a PNG as tokenize writes it, with its (size / patch)^2 int16 codes.
Reports mean bytes per view, per image row at K views, and the zstd Parquet bytes of the
image rows at K = 1 and K (codes drawn uniformly from 512: no model needed, and the least
compressible codes), plus the CPU time of one augmented view.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import time

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from model.images import preprocess
from pipelines.common.augment import AugmentConfig, augmented_views
from pipelines.common.schema import shard_table
from pipelines.demo_data import encode_image
from pipelines.demo_data.scenes import render_scene
from pipelines.tokenize.actor import _png


def view_pngs(data: bytes, sample_id: str, size: int, views: int) -> tuple[list[bytes], float]:
    """(PNG of each of the image's ``views`` views, seconds spent on the augmented ones)."""
    with Image.open(io.BytesIO(data)) as img:
        centre = preprocess(img, size).mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        start = time.process_time()
        extra = augmented_views(img, AugmentConfig(), sample_id, views, size, allow_flip=True)
        seconds = time.process_time() - start
    return [_png(v, 6) for v in [centre, *extra]], seconds


def parquet_bytes(rows: list[dict], views: int) -> int:
    table = shard_table({k: [r[k] for r in rows] for k in rows[0]}, views)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.tell()


def measure(images: int = 50, size: int = 96, patch: int = 16, views: int = 3) -> dict:
    rng, codes_rng = random.Random(0), np.random.default_rng(0)
    n_codes = (size // patch) ** 2
    rows, seconds = [], 0.0
    for i in range(images):
        scene, _, _ = render_scene(rng, 96)
        data = encode_image(scene, "jpg" if i % 2 else "png", 90)
        pngs, spent = view_pngs(data, f"image-{i}", size, views)
        seconds += spent
        codes = [codes_rng.integers(0, 512, n_codes).astype(np.int16) for _ in range(views)]
        rows.append({"id": f"image-{i}", "modality": "image", "text_ids": None, "image": pngs[0],
                     "visual_tokens": codes[0], "source": "demo", "aug_images": pngs[1:],
                     "aug_visual_tokens": codes[1:]})
    centre = float(np.mean([len(r["image"]) for r in rows]))
    augmented = float(np.mean([len(p) for r in rows for p in r["aug_images"]])) if views > 1 else 0.0
    code_bytes = 2 * n_codes
    return {"images": images, "size": size, "codes_per_view": n_codes, "code_bytes_per_view": code_bytes,
            "png_bytes_view_0": round(centre), "png_bytes_augmented_view": round(augmented),
            "bytes_per_image": {k: round(centre + code_bytes + (k - 1) * (augmented + code_bytes))
                                for k in range(1, views + 1)},
            "parquet_bytes_per_image_row": {1: round(parquet_bytes(rows, 1) / images),
                                            views: round(parquet_bytes(rows, views) / images)},
            "ms_per_augmented_view": round(1000 * seconds / max(1, images * (views - 1)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--views", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(args.images, args.size, args.patch, args.views), indent=2))


if __name__ == "__main__":
    main()
