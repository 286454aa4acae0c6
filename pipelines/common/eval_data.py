"""Evaluation inputs: Karpathy-split caption JSON (COCO / Flickr30k / the demo) and ImageFolders.

Images are preprocessed as the tokenize stage prepares shard images: the visual
tokenizer's transform (``model.images.preprocess``: shorter side to S*256/224,
bicubic, center crop S) at the backbone's image size, then the backbone's
normalisation (x - 0.5) / 0.5. Files are read only under the declared root.
"""
from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass

import torch
from PIL import Image

from model.images import preprocess
from pipelines.common import storage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def inside(root: str, relative: str) -> str:
    """root joined with a relative path that must not escape root ('..', absolute paths)."""
    rel = posixpath.normpath(relative.replace("\\", "/"))
    if rel.startswith(("/", "../")) or rel == ".." or "://" in rel:
        raise ValueError(f"{relative!r} escapes the evaluation folder {root}")
    return storage.join(root, rel)


def load_image(path: str, image_size: int) -> torch.Tensor:
    """Image file -> FloatTensor (3, S, S) in [-1, 1]."""
    try:
        with Image.open(io.BytesIO(storage.read_bytes(path))) as img:
            x = preprocess(img, image_size)  # (3, S, S) in [0, 1]
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the image: {err}") from err
    return x.sub_(0.5).div_(0.5)


def load_images(paths: list[str], image_size: int) -> torch.Tensor:
    """-> (N, 3, S, S)."""
    return torch.stack([load_image(p, image_size) for p in paths])


@dataclass(frozen=True)
class CaptionSplit:
    """Images of one split and their captions; caption_image[j] = index of caption j's image."""

    image_paths: list[str]
    captions: list[str]
    caption_image: list[int]


def read_karpathy(dataset_json: str, image_root: str | None, splits: tuple[str, ...]) -> CaptionSplit:
    """Images whose ``split`` is in ``splits``, from a Karpathy-format dataset.json.

    Image path: image_root / filepath / filename (Flickr30k's file has no filepath);
    image_root defaults to the JSON's folder.
    """
    root = image_root or posixpath.dirname(dataset_json) or "."
    data = storage.read_json(dataset_json)
    paths, captions, owner = [], [], []
    for entry in data["images"]:
        if entry.get("split") not in splits:
            continue
        texts = [s["raw"].strip() for s in entry.get("sentences", []) if s.get("raw", "").strip()]
        if not texts:
            continue
        paths.append(inside(root, posixpath.join(entry.get("filepath") or "", entry["filename"])))
        captions += texts
        owner += [len(paths) - 1] * len(texts)
    if not paths:
        raise ValueError(f"{dataset_json}: no images with captions in split(s) {list(splits)}")
    return CaptionSplit(paths, captions, owner)


def read_image_folder(root: str, split: str, classes: list[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """ImageFolder root/split/<class>/<file> -> (paths, labels, classes); classes sorted by name
    unless given (the train split's, so val labels use the same indices)."""
    base = storage.join(root, split)
    files = [p for p in storage.list_files(base) if p.lower().endswith(IMAGE_SUFFIXES)]
    labelled = [(p, p[len(base) + 1:].split("/")[0]) for p in files if "/" in p[len(base) + 1:]]
    if not labelled:
        raise ValueError(f"{base}: no images in <class>/ subfolders")
    classes = classes or sorted({c for _, c in labelled})
    unknown = sorted({c for _, c in labelled} - set(classes))
    if unknown:
        raise ValueError(f"{base}: classes {unknown} are not in the train split's {classes}")
    return [p for p, _ in labelled], [classes.index(c) for _, c in labelled], classes
