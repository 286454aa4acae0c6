"""demo_data stage: generate the embedded demo corpus deterministically (no download).

Everything comes from two generators that every machine has: rendered shape
scenes (pipelines.demo_data.scenes) and the Python standard library's docstrings
(pipelines.demo_data.text). The corpus is written in the formats users bring
(docs/INTERFACES.md, "data/demo/"):

    text/docs-NNNNN.jsonl                     {"id", "text"} per line
    images/<NN>/<key>.png|jpg                 caption-less scenes
    pairs/NNNNN.tar                           WebDataset, img2dataset layout:
                                              <key>.jpg, <key>.txt, <key>.json
    eval/retrieval/dataset.json + images/     Karpathy-split format, with labels
    eval/classification/{train,val}/<class>/<key>.png   ImageFolder (class: probe_label's value)
    manifest.json                             every file's sha256 and the counts

Each output draws from its own RNG stream (seeded by cfg.seed and the stream's
name), and no scene's pixels are ever written twice, so the held-out
evaluation scenes never repeat a training pair or image. Encoders, member
order, tar headers and JSON key order are fixed: the same config gives
byte-identical files on every run.

Modules: scenes.py (one shape scene, its labels and caption, from an RNG), text.py (stdlib
docstrings as documents); this module writes every output and the manifest.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import re
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image

from pipelines.common import storage
from pipelines.common.configs import check
from pipelines.demo_data.scenes import COLORS, SHAPES, SIZES, render_scene
from pipelines.demo_data.text import stdlib_docs

IMAGES_PER_FOLDER = 100
MANIFEST = "manifest.json"
_TAR_MTIME = 0  # fixed member headers: no clock, user or group leaks into the tar bytes
PROBE_CLASSES = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES)}


@dataclass(frozen=True)
class DemoDataConfig:
    out_dir: str = field(kw_only=True)
    seed: int = 0
    image_size: int = 96
    num_pairs: int = 3000
    num_images: int = 1000
    max_text_docs: int = 20000        # cap; above the stdlib's count, so the demo keeps them all
    num_retrieval_train: int = 1000
    num_retrieval_test: int = 500
    num_probe_train: int = 600        # single-object scenes, class = the object's probe_label
    num_probe_val: int = 900
    probe_label: str = "color"        # color | shape | size
    pairs_per_tar: int = 1000
    text_docs_per_file: int = 5000
    jpeg_quality: int = 90

    def __post_init__(self):
        check(self.image_size >= 16, f"demo_data.image_size must be >= 16, got {self.image_size}")
        for name in ("num_pairs", "num_images", "max_text_docs", "num_retrieval_train",
                     "num_retrieval_test", "num_probe_train", "num_probe_val"):
            check(getattr(self, name) >= 0, f"demo_data.{name} must be >= 0, got {getattr(self, name)}")
        # img2dataset keys are <5-digit shard><4-digit index>
        check(1 <= self.pairs_per_tar <= 10_000,
              f"demo_data.pairs_per_tar must be 1-10000, got {self.pairs_per_tar}")
        check(self.text_docs_per_file >= 1,
              f"demo_data.text_docs_per_file must be >= 1, got {self.text_docs_per_file}")
        check(self.probe_label in PROBE_CLASSES,
              f"demo_data.probe_label must be one of {list(PROBE_CLASSES)}, got {self.probe_label!r}")
        check(1 <= self.jpeg_quality <= 95,
              f"demo_data.jpeg_quality must be 1-95, got {self.jpeg_quality}")


@dataclass
class _Writer:
    """Writes files under out_dir and remembers each one's sha256 for the manifest."""
    out_dir: str
    hashes: dict[str, str] = field(default_factory=dict)
    total_bytes: int = 0

    def write(self, rel: str, data: bytes) -> None:
        storage.write_bytes(storage.join(self.out_dir, rel), data)
        self.hashes[rel] = storage.sha256(data)
        self.total_bytes += len(data)


@dataclass
class _Scenes:
    """Scene source that never yields the same pixels twice (across all outputs)."""
    image_size: int
    seen: set[bytes] = field(default_factory=set)
    redrawn: int = 0

    def draw(self, rng: random.Random, num_objects: int | None = None):
        while True:
            image, labels, caption = render_scene(rng, self.image_size, num_objects)
            digest = hashlib.sha256(image.tobytes()).digest()
            if digest not in self.seen:
                self.seen.add(digest)
                return image, labels, caption
            self.redrawn += 1


def generate_demo_data(cfg: DemoDataConfig) -> dict:
    """Write the demo corpus into cfg.out_dir (replacing an earlier demo output) -> metrics.

    Built in a temporary sibling and renamed into place (storage.publish_dir), so a killed
    run leaves out_dir as it was; on object storage out_dir is emptied and written directly.
    """
    _check_replaceable(cfg.out_dir)
    staging = storage.staging_dir(cfg.out_dir)
    # A placeholder manifest marks the folder as ours, so a rerun after a crash may clear it.
    storage.write_bytes(storage.join(staging, MANIFEST), _json_bytes({"complete": False}))
    writer = _Writer(staging)
    scenes = _Scenes(cfg.image_size)
    metrics = {"seed": cfg.seed, "image_size": cfg.image_size}
    # Training outputs first: the held-out scenes below skip any pixels seen here.
    metrics.update(_write_pairs(cfg, writer, scenes))
    metrics.update(_write_images(cfg, writer, scenes))
    metrics.update(_write_retrieval(cfg, writer, scenes))
    metrics.update(_write_probe(cfg, writer, scenes))
    metrics.update(_write_text(cfg, writer))
    metrics["duplicate_scenes_redrawn"] = scenes.redrawn
    metrics["files"] = len(writer.hashes)
    metrics["bytes"] = writer.total_bytes
    metrics["sha256"] = storage.sha256(_json_bytes(writer.hashes))
    writer.write(MANIFEST, _json_bytes({"complete": True, "metrics": metrics, "files": writer.hashes},
                                       indent=1))
    storage.publish_dir(staging, cfg.out_dir)
    return metrics


def stream(seed: int, name: str) -> random.Random:
    """The RNG of one output; str seeds are hashed with SHA-512, so no PYTHONHASHSEED leaks in."""
    return random.Random(f"demo_data/{seed}/{name}")


def encode_image(image: Image.Image, fmt: str, jpeg_quality: int = 90) -> bytes:
    """PNG or JPEG bytes with every encoder setting fixed (no metadata, no timestamps)."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", optimize=False, compress_level=6)
    elif fmt == "jpg":
        image.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0,
                   optimize=False, progressive=False)
    else:
        raise ValueError(f"unknown image format {fmt!r}; use png or jpg")
    return buf.getvalue()


def _write_pairs(cfg: DemoDataConfig, writer: _Writer, scenes: _Scenes) -> dict:
    rng = stream(cfg.seed, "pairs")
    num_tars = -(-cfg.num_pairs // cfg.pairs_per_tar)
    for shard in range(num_tars):
        members = []
        start = shard * cfg.pairs_per_tar
        for i in range(min(cfg.pairs_per_tar, cfg.num_pairs - start)):
            key = f"{shard:05d}{i:04d}"
            image, labels, caption = scenes.draw(rng)
            record = {**labels, "key": key, "caption": caption, "status": "success",
                      "width": image.width, "height": image.height}
            members += [(f"{key}.jpg", encode_image(image, "jpg", cfg.jpeg_quality)),
                        (f"{key}.txt", caption.encode()),
                        (f"{key}.json", _json_bytes(record))]
        writer.write(f"pairs/{shard:05d}.tar", tar_bytes(members))
    return {"pairs": cfg.num_pairs, "pair_tars": num_tars}


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of (name, data) in the given order, with fixed headers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write_images(cfg: DemoDataConfig, writer: _Writer, scenes: _Scenes) -> dict:
    rng = stream(cfg.seed, "images")
    formats = Counter()
    for i in range(cfg.num_images):
        image, _, _ = scenes.draw(rng)
        fmt = "jpg" if rng.random() < 0.5 else "png"  # both formats reach the image cleaner
        formats[fmt] += 1
        writer.write(f"images/{i // IMAGES_PER_FOLDER:02d}/image-{i:07d}.{fmt}",
                     encode_image(image, fmt, cfg.jpeg_quality))
    return {"images": cfg.num_images, "images_png": formats["png"], "images_jpg": formats["jpg"]}


def _write_retrieval(cfg: DemoDataConfig, writer: _Writer, scenes: _Scenes) -> dict:
    """Karpathy-split dataset.json (one caption per image) plus its PNGs under images/."""
    rng = stream(cfg.seed, "retrieval")
    entries = []
    splits = ["train"] * cfg.num_retrieval_train + ["test"] * cfg.num_retrieval_test
    for imgid, split in enumerate(splits):
        image, labels, caption = scenes.draw(rng)
        filename = f"retrieval-{imgid:06d}.png"
        writer.write(f"eval/retrieval/images/{filename}", encode_image(image, "png"))
        entries.append({
            "filepath": "images", "filename": filename, "split": split,
            "imgid": imgid, "sentids": [imgid], "labels": labels,
            "sentences": [{"raw": caption, "tokens": caption_tokens(caption),
                           "imgid": imgid, "sentid": imgid}],
        })
    writer.write("eval/retrieval/dataset.json",
                 _json_bytes({"dataset": "demo_shapes", "images": entries}))
    return {"retrieval_train": cfg.num_retrieval_train, "retrieval_test": cfg.num_retrieval_test}


def caption_tokens(caption: str) -> list[str]:
    """Karpathy-style tokens: lower-case words, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", caption.lower())


def _write_probe(cfg: DemoDataConfig, writer: _Writer, scenes: _Scenes) -> dict:
    """ImageFolder of single-object scenes (class = the object's cfg.probe_label) plus
    labels.json with every label of each image (so any other label can be probed too)."""
    rng = stream(cfg.seed, "probe")
    classes = PROBE_CLASSES[cfg.probe_label]
    all_labels, counts = {}, {}
    for split, n in (("train", cfg.num_probe_train), ("val", cfg.num_probe_val)):
        counts[split] = dict.fromkeys(classes, 0)
        for i in range(n):
            image, labels, _ = scenes.draw(rng, num_objects=1)
            label = labels[cfg.probe_label]
            rel = f"{split}/{label}/probe-{split}-{i:06d}.png"
            writer.write(f"eval/classification/{rel}", encode_image(image, "png"))
            all_labels[rel] = labels
            counts[split][label] += 1
    writer.write("eval/classification/labels.json",
                 _json_bytes({"classes": list(classes), "label": cfg.probe_label, "images": all_labels}))
    return {"probe_train": cfg.num_probe_train, "probe_val": cfg.num_probe_val,
            "probe_label": cfg.probe_label, "probe_class_counts": counts}


def _write_text(cfg: DemoDataConfig, writer: _Writer) -> dict:
    """Standard-library docstrings as JSONL; a seeded sample if more than max_text_docs."""
    docs, missing = stdlib_docs()
    if len(docs) > cfg.max_text_docs:
        keep = sorted(stream(cfg.seed, "text").sample(range(len(docs)), cfg.max_text_docs))
        docs = [docs[i] for i in keep]
    for start in range(0, len(docs), cfg.text_docs_per_file):
        lines = [json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False, sort_keys=True)
                 for d in docs[start:start + cfg.text_docs_per_file]]
        writer.write(f"text/docs-{start // cfg.text_docs_per_file:05d}.jsonl",
                     ("\n".join(lines) + "\n").encode())
    return {"text_docs": len(docs), "text_chars": sum(len(d.text) for d in docs),
            "text_files": -(-len(docs) // cfg.text_docs_per_file),
            "text_modules_missing": missing,
            "python_version": f"{sys.version_info.major}.{sys.version_info.minor}"}


def _check_replaceable(out_dir: str) -> None:
    """Refuse to replace a non-empty out_dir that holds no earlier demo output."""
    if storage.list_files(out_dir) and not storage.exists(storage.join(out_dir, MANIFEST)):
        raise FileExistsError(
            f"demo_data.out_dir {out_dir!r} is not empty and has no {MANIFEST} from an earlier "
            "demo_data run; choose another out_dir or delete it yourself")


def _json_bytes(obj, indent: int | None = None) -> bytes:
    """Deterministic JSON (sorted keys); compact unless indent is given."""
    separators = None if indent else (",", ":")
    text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False, separators=separators)
    return (text + "\n").encode()


__all__ = ["DemoDataConfig", "generate_demo_data", "render_scene", "encode_image",
           "tar_bytes", "caption_tokens", "stream"]
