"""Evaluation inputs: Karpathy-split caption JSON (COCO / Flickr30k / the demo) and ImageFolders.

Images are preprocessed as the tokenize stage prepares shard images: the visual
tokenizer's transform (``model.images.preprocess``: shorter side to S*256/224,
bicubic, center crop S) at the backbone's image size, then the backbone's
normalisation (x - 0.5) / 0.5. Files are read only under the declared root.

Evaluation sets are read lazily (``ImageFiles``): only the images of the batch at hand are
decoded, so memory follows the batch size, not the size of the set (a whole COCO split as
one float tensor does not fit in memory); ``prefetched`` decodes the next batch in a
background thread while the model works on the current one.
"""
from __future__ import annotations

import io
import posixpath
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

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


def load_images(paths: Sequence[str], image_size: int) -> torch.Tensor:
    """A batch of image files -> (B, 3, S, S)."""
    return torch.stack([load_image(p, image_size) for p in paths])


@dataclass(frozen=True)
class ImageFiles:
    """An image set read on demand: ``load`` decodes just the images asked for."""

    paths: tuple[str, ...]
    image_size: int

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Images at ``indices`` (in that order) -> (B, 3, S, S) in [-1, 1]."""
        idx = indices.tolist() if torch.is_tensor(indices) else indices
        return load_images([self.paths[i] for i in idx], self.image_size)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive batches (B <= batch_size, 3, S, S) in file order, the next one decoded
        while the caller uses the current one."""
        starts = range(0, len(self.paths), batch_size)
        return prefetched(lambda s: self.load(range(s, min(s + batch_size, len(self.paths)))), starts)


T = TypeVar("T")
R = TypeVar("R")


def prefetched(load: Callable[[T], R], jobs: Iterable[T]) -> Iterator[R]:
    """``load(job)`` for each job, in order, the next job's load running in one background
    thread while the caller works on the current result: image decoding (Pillow releases the
    GIL) overlaps the model, and at most two results are alive at a time. ``jobs`` is consumed
    one item ahead of what has been yielded."""
    with ThreadPoolExecutor(1, thread_name_prefix="eval-decode") as pool:
        pending = None
        for job in jobs:
            future = pool.submit(load, job)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


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
