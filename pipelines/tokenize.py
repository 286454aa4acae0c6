"""tokenize stage: one Ray Data job running both tokenizers over the cleaned data.

Work units are row ranges: cleaned part ``clean_dir/{kind}/part-NNNNN.parquet``
(kind: text, image, pair) is cut into consecutive ranges of ``rows_per_task``
rows, and unit U becomes ``out_dir/{kind}/part-NNNNN-UUUUU.parquet`` in
SHARD_SCHEMA, so one huge part spreads over every actor and the sorted file names
list the rows in input order (the units of a part together hold exactly the rows
a whole-part task would give). For images the range length is rounded up to a
multiple of ``batch_size``: every image then meets the same VQ-KD batch as in a
whole-part run, so its codes do not depend on ``rows_per_task`` (batch shapes can
change float results, on GPUs above all). The job's rows are the units still to
do; an actor pool (fractional CPUs, optional GPUs) loads the sentencepiece model
and the VQ-KD model once per actor and tokenizes one unit per call, reading only
the Parquet row groups that hold its rows, streamed in record batches (memory:
one unit, not one part), in batches of ``batch_size`` images.

- Texts: a document longer than ``max_text_tokens`` (with ``<s>``/``</s>``)
  becomes consecutive chunks, each its own sample with id
  sha256("<doc id>:<chunk index>"); a document that fits keeps its id.
- Captions are truncated to ``max_caption_tokens`` (the official rule).
- Images: the VQ-KD transform (resize, center crop) gives the exact view that
  is tokenized; it is stored as PNG (zlib's run-length strategy at a fixed
  level, no metadata, so the bytes are deterministic) with its codes as int16.
  RLE because it encodes much faster than Pillow's default strategy and is no
  larger for these views; at the default strategy the encode would cost more than
  decode + VQ-KD together.
- Views: with ``views_per_image`` K > 1 each image row also keeps K - 1 augmented views
  (pipelines.common.augment, seeded by (augment.seed, id, view); pairs never flipped) and
  their codes in the view columns of pipelines.common.schema; view 0 stays the centre crop,
  and each view is its own VQ-KD batch, so view 0's codes are K = 1's. K = 1 outputs are
  byte for byte those from before views existed (see :func:`fingerprint_params`).

Tokenizers: the driver reads both tokenizers' files once through
pipelines.common.storage (local or s3://) and hands the bytes to the actors through
Ray's object store, so actors on other machines need no access to its paths.

Resume: a unit is done when its output file exists (written atomically) and
its Parquet metadata holds the fingerprint of (input part sha256, the unit's row
range, tokenizer hashes, output-relevant params); a rerun skips done units and
deletes outputs that no unit of this run expects (input part gone, other ranges).
``tokenizers.json`` (both tokenizers' hashes, read by pack for the manifest) is
written beside the parts.

Metrics: ``units`` / ``units_done`` / ``units_skipped`` count units (done: run
now; skipped: finished before); ``parts`` counts input parts, ``parts_done`` those
with at least one unit run now, ``parts_skipped`` those with every unit finished
before; ``actor_processes`` is how many actor processes ran units; per-kind row
and token counts cover every unit, finished now or before.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from model.text_tokenizer import MODEL_FILE, TextTokenizer
from pipelines.common import storage
from pipelines.common.augment import AugmentConfig, augmented_views
from pipelines.common.configs import check
from pipelines.common.ray_session import RayConfig, ray_session, release_freed_heap
from pipelines.common.remote_outputs import StageOutput
from pipelines.common.schema import MODALITIES, TOKENIZERS, VIEW_COLUMNS, shard_table

METADATA_KEY = b"beit3.tokenize"
STAT_KEYS = ("rows_in", "rows_out", "text_tokens", "chunked_docs", "empty_texts", "truncated_captions", "images")
VISUAL_FILES = ("config.json", "model.safetensors")
COLUMNS = {"text": ["id", "text", "source"], "image": ["id", "image", "source"],
           "pair": ["id", "image", "source", "caption"]}  # what each kind's unit reads of its part
PNG_STRATEGY = 3   # zlib Z_RLE (see the module docstring); part of every unit's fingerprint
READ_BATCH = 256        # rows per record batch when reading a unit (also how rows before it are skipped)
READ_BUFFER = 1 << 20   # Parquet pages stream through this buffer: a huge row group is never read whole


@dataclass(frozen=True)
class TokenizeConfig(StageOutput):
    batch_size: int = 64                    # images per VQ-KD forward
    num_actors: int = 2
    num_gpus: float = 0.0                   # per actor; > 0 runs VQ-KD on GPU actors
    max_text_tokens: int = 256              # per text sample incl. <s> </s>; longer docs are chunked
    max_caption_tokens: int = 64            # captions are truncated to this (incl. <s> </s>)
    precision: Literal["fp32", "bf16"] = "fp32"  # VQ-KD encoder autocast (bf16: GPU speed)
    png_compress_level: int = 6
    rows_per_task: int = 2048               # input rows per Ray task (images: rounded up to batch_size)
    views_per_image: int = 1                # K views per image row: view 0 the centre crop, 1..K-1 augmented
    augment: AugmentConfig = AugmentConfig()  # the transform of views 1..K-1 (BEiT v2's)

    def __post_init__(self):
        super().__post_init__()
        check(self.batch_size >= 1, "tokenize.batch_size: must be >= 1")
        check(self.num_actors >= 1, "tokenize.num_actors: must be >= 1")
        check(self.num_gpus >= 0, "tokenize.num_gpus: must be >= 0")
        check(self.max_text_tokens >= 3, "tokenize.max_text_tokens: must be >= 3")
        check(self.max_caption_tokens >= 3, "tokenize.max_caption_tokens: must be >= 3")
        check(0 <= self.png_compress_level <= 9, "tokenize.png_compress_level: must be in [0, 9]")
        check(self.rows_per_task >= 1, "tokenize.rows_per_task: must be >= 1")
        check(self.views_per_image >= 1, "tokenize.views_per_image: must be >= 1")


def tokenize_corpus(cfg: TokenizeConfig, clean_dir: str, text_tokenizer_dir: str,
                    visual_tokenizer_dir: str, ray_cfg: RayConfig) -> dict:
    """Tokenize every unit of the cleaned parts not yet done into ``cfg.data_dir``; returns metrics."""
    start = time.time()
    files = read_tokenizer_files(text_tokenizer_dir, visual_tokenizer_dir)
    tokenizers = tokenizer_info(files, text_tokenizer_dir, visual_tokenizer_dir)
    units = plan_units(cfg, clean_dir, json.dumps([tokenizers, fingerprint_params(cfg)], sort_keys=True))
    if not units:
        raise FileNotFoundError(f"{clean_dir}: no cleaned parts under text/, image/ or pair/")
    jobs, finished = [], []
    for unit in units:
        previous = _output_metadata(unit["out"])
        if previous.get("fingerprint") == unit["fingerprint"]:
            finished.append(previous["stats"])
        else:
            jobs.append(unit)
    _remove_stale(cfg.data_dir, {unit["out"] for unit in units})
    stats = _run(cfg, ray_cfg, jobs, files) if jobs else []
    storage.write_json(storage.join(cfg.data_dir, TOKENIZERS), tokenizers)
    metrics = _metrics(units, jobs, finished, stats)
    metrics["seconds"] = round(time.time() - start, 2)
    return metrics


def fingerprint_params(cfg: TokenizeConfig) -> dict:
    """The params every unit's fingerprint holds. The unit's row range is in its fingerprint,
    so rows_per_task itself is not; with one view per image the view params are left out,
    so K = 1 fingerprints (and outputs) are those from before views existed."""
    params = cfg.content_params() | {"num_actors": None, "rows_per_task": None, "png_strategy": PNG_STRATEGY}
    if cfg.views_per_image == 1:
        del params["views_per_image"], params["augment"]
    return params


def plan_units(cfg: TokenizeConfig, clean_dir: str, base: str) -> list[dict]:
    """Every unit of every cleaned part, in output order: {kind, path, out, start, stop, fingerprint}.

    ``base`` (tokenizers and params) enters every fingerprint, with the part's sha256 and
    the unit's row range [start, stop)."""
    units = []
    for kind in MODALITIES:
        for path in storage.list_files(storage.join(clean_dir, kind), ".parquet"):
            digest = storage.sha256_file(path)
            stem = path.rsplit("/", 1)[-1].removesuffix(".parquet")
            for u, (start, stop) in enumerate(row_ranges(_num_rows(path), unit_rows(cfg, kind))):
                fingerprint = storage.sha256(f"{base}\0{kind}\0{digest}\0{start}\0{stop}".encode())
                out = storage.join(cfg.data_dir, kind, f"{stem}-{u:05d}.parquet")
                units.append({"kind": kind, "path": path, "out": out, "start": start, "stop": stop,
                              "fingerprint": fingerprint})
    return units


def unit_rows(cfg: TokenizeConfig, kind: str) -> int:
    """Rows per unit of a ``kind`` part: image units start on VQ-KD batch boundaries (module docstring)."""
    if kind == "text":
        return cfg.rows_per_task
    return -(-cfg.rows_per_task // cfg.batch_size) * cfg.batch_size


def row_ranges(num_rows: int, step: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of ``step`` rows (the last may be short); an empty part
    still gets one (empty) unit, so every input part has an output."""
    return [(a, min(a + step, num_rows)) for a in range(0, num_rows, step)] or [(0, 0)]


def _metrics(units: list[dict], jobs: list[dict], finished: list[dict], stats: list[dict]) -> dict:
    """Stage metrics (see the module docstring) from the plan and the units' stats."""
    parts, parts_run = {u["path"] for u in units}, {j["path"] for j in jobs}
    metrics = {"units": len(units), "units_done": len(jobs), "units_skipped": len(finished),
               "parts": len(parts), "parts_done": len(parts_run), "parts_skipped": len(parts - parts_run),
               "actor_processes": len({s["pid"] for s in stats})}
    for key in STAT_KEYS:  # over every output unit, finished in this run or before
        for kind in MODALITIES:
            total = sum(s[key] for s in stats + finished if s["kind"] == kind)
            if total:
                metrics[f"{kind}_{key}"] = total
    images = sum(s["images"] for s in stats)
    metrics["images_per_s_per_actor"] = round(images / max(sum(s["seconds"] for s in stats), 1e-9), 1)
    return metrics


def read_tokenizer_files(text_tokenizer_dir: str, visual_tokenizer_dir: str) -> dict:
    """{"text": spm.model bytes, "visual": {file name: bytes}}, read through pipelines.common.storage."""
    return {"text": storage.read_bytes(storage.join(text_tokenizer_dir, MODEL_FILE)),
            "visual": {name: storage.read_bytes(storage.join(visual_tokenizer_dir, name)) for name in VISUAL_FILES}}


def tokenizer_info(files: dict, text_tokenizer_dir: str, visual_tokenizer_dir: str) -> dict:
    """Hashes and sizes of both tokenizers (recorded by pack in the shard manifest)."""
    text = TextTokenizer.from_bytes(files["text"], storage.join(text_tokenizer_dir, MODEL_FILE))
    visual = json.loads(files["visual"]["config.json"])
    hashes = {name: storage.sha256(data) for name, data in files["visual"].items()}
    n_codes = visual["n_codes"]
    if n_codes > np.iinfo(np.int16).max + 1:
        raise ValueError(f"{visual_tokenizer_dir}: {n_codes} codes do not fit the int16 visual_tokens column")
    return {
        "text": {"sha256": text.sha256, "vocab_size": text.vocab_size, "convention": text.convention,
                 **text.special_ids},
        "visual": {"sha256": storage.sha256(json.dumps(hashes, sort_keys=True).encode()), "files": hashes,
                   "image_size": visual["image_size"], "patch_size": visual["patch_size"],
                   "n_codes": n_codes},
    }


def _run(cfg: TokenizeConfig, ray_cfg: RayConfig, jobs: list[dict], files: dict) -> list[dict]:
    with ray_session(ray_cfg) as ray:
        files_ref = ray.put(files)  # held here until the job ends; each actor fetches it once
        ds = ray.data.from_items(jobs, override_num_blocks=len(jobs))
        ds = ds.map_batches(
            PartTokenizer, batch_size=1,
            fn_constructor_kwargs={"cfg": cfg, "files": [files_ref],  # a list: Ray passes the reference
                                   "threads": max(1, int(ray_cfg.cpus_per_task))},
            compute=ray.data.ActorPoolStrategy(size=min(cfg.num_actors, len(jobs))),
            num_cpus=ray_cfg.cpus_per_task, num_gpus=cfg.num_gpus or None)
        return ds.take_all()


class PartTokenizer:
    """Ray Data actor: both models loaded once; one unit (a row range of a cleaned part) in, one
    tokenized unit file out. (The worker-retry test finds its process by this class name.)"""

    def __init__(self, cfg: TokenizeConfig, files: list, threads: int):
        import ray
        import torch

        torch.set_num_threads(threads)
        self.cfg = cfg
        files = ray.get(files[0])
        self.text = TextTokenizer.from_bytes(files["text"])
        self.visual_files = files["visual"]
        self.device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.vqkd = None  # loaded on the first image unit: text-only actors never pay for it

    def __call__(self, batch: dict) -> dict:
        start = time.time()
        stats = self.tokenize_unit({k: batch[k][0] for k in batch})
        release_freed_heap()  # the unit is gone: keep the actor's peak flat over many units
        return {k: [v] for k, v in {**stats, "seconds": time.time() - start, "pid": os.getpid()}.items()}

    def tokenize_unit(self, job: dict) -> dict:
        """Read the unit's rows, tokenize, write its file; returns its stats. Memory: each copy
        of an image unit (its input rows, the output rows as Python objects, as Arrow, as
        Parquet) is tens of MB, so each is dropped as soon as the next exists."""
        kind = str(job["kind"])
        rows, stats = self.tokenize_rows(kind, str(job["path"]), int(job["start"]), int(job["stop"]))
        stats = {"kind": kind, **dict.fromkeys(STAT_KEYS, 0), **stats, "rows_out": len(rows["id"])}
        # the unit's own record: rerun skips it when the fingerprint matches, metrics reuse stats
        record = json.dumps({"fingerprint": str(job["fingerprint"]), "stats": stats}, sort_keys=True)
        table = shard_table(rows, self.cfg.views_per_image)  # K > 1: its metadata records K; keep it
        del rows
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: record.encode()})
        storage.write_parquet(table, str(job["out"]))
        return stats

    def tokenize_rows(self, kind: str, path: str, start: int, stop: int) -> tuple[dict, dict]:
        """Rows [start, stop) of a cleaned part -> (output rows, stats); the input table is
        freed on return."""
        table = read_rows(path, COLUMNS[kind], start, stop)
        if kind == "text":
            return self.texts(table)
        return self.images(table, path, with_captions=kind == "pair")

    def texts(self, table: pa.Table) -> tuple[dict, dict]:
        ids, sources = table["id"].to_pylist(), table["source"].to_pylist()
        rows = _empty_rows()
        span = self.cfg.max_text_tokens - 2
        chunked = empty = tokens = 0
        for doc_id, source, body in zip(ids, sources, self.text.encode_bodies(table["text"].to_pylist())):
            chunks = [body[i:i + span] for i in range(0, len(body), span)]
            empty += not chunks
            chunked += len(chunks) > 1
            for k, chunk in enumerate(chunks):
                sample_id = doc_id if len(chunks) == 1 else hashlib.sha256(f"{doc_id}:{k}".encode()).hexdigest()
                _append(rows, sample_id, "text", self.text.wrap(chunk), None, None, source)
                tokens += len(chunk) + 2
        return rows, {"rows_in": len(ids), "chunked_docs": chunked, "empty_texts": empty, "text_tokens": tokens}

    def images(self, table: pa.Table, path: str, with_captions: bool) -> tuple[dict, dict]:
        rows, truncated, tokens = _empty_rows(), 0, 0
        for start in range(0, table.num_rows, self.cfg.batch_size):
            part = table.slice(start, self.cfg.batch_size).to_pydict()
            views = self.tokenize_images(part["image"], part["id"], path, allow_flip=not with_captions)
            bodies = self.text.encode_bodies(part["caption"]) if with_captions else None
            for i, (sample_id, source) in enumerate(zip(part["id"], part["source"])):
                text_ids = None
                if with_captions:
                    body = bodies[i]
                    text_ids = self.text.wrap(body, self.cfg.max_caption_tokens)
                    truncated += len(body) + 2 > len(text_ids)
                    tokens += len(text_ids)
                aug = ([v[0][i] for v in views[1:]], [v[1][i] for v in views[1:]]) if len(views) > 1 else (None, None)
                _append(rows, sample_id, "pair" if with_captions else "image", text_ids, views[0][0][i],
                        views[0][1][i], source, *aug)
        return rows, {"rows_in": table.num_rows, "images": table.num_rows,
                      "truncated_captions": truncated, "text_tokens": tokens}

    def tokenize_images(self, images: list[bytes], ids: list[str], path: str,
                        allow_flip: bool) -> list[tuple[list[bytes], np.ndarray]]:
        """Encoded images -> per view v < K: (PNG of each image's view v, codes (B, N) int16);
        view 0 is the centre crop, views 1..K-1 augmented (flipped only if ``allow_flip``)."""
        import torch
        from PIL import Image

        from model.images import preprocess
        from model.vqkd import VQKD

        if self.vqkd is None:
            self.vqkd = VQKD.deserialize(self.visual_files, source="visual tokenizer bytes").to(self.device)
        size, k = self.vqkd.config.image_size, self.cfg.views_per_image
        views = [[] for _ in range(k)]  # per view: (3, S, S) uint8, exactly what PNG stores
        for data, sample_id in zip(images, ids):
            try:
                with Image.open(io.BytesIO(data)) as img:
                    x = preprocess(img, size)  # (3, S, S) in [0, 1]
                    extra = augmented_views(img, self.cfg.augment, sample_id, k, size, allow_flip)
            except (OSError, ValueError) as err:
                raise ValueError(f"{path}: image {sample_id} cannot be decoded ({err}); "
                                 "the clean stage should have rejected it") from err
            views[0].append(x.mul(255).round().clamp(0, 255).to(torch.uint8))
            for v, pixels in enumerate(extra, start=1):
                views[v].append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
        return [self.encode_views(batch) for batch in views]

    def encode_views(self, views: list) -> tuple[list[bytes], np.ndarray]:
        """B views (3, S, S) uint8 -> (their PNGs, codes (B, N) int16): one VQ-KD batch."""
        import torch

        pngs = [_png(v.permute(1, 2, 0).numpy(), self.cfg.png_compress_level) for v in views]
        x = torch.stack(views).float().div(255)  # (B, 3, S, S), identical to decoding the PNGs
        autocast = torch.bfloat16 if self.cfg.precision == "bf16" else None
        codes = self.vqkd.codes(x.to(self.device), autocast_dtype=autocast)
        return pngs, codes.cpu().numpy().astype(np.int16)


def _png(pixels: np.ndarray, level: int) -> bytes:
    """(S, S, 3) uint8 -> PNG bytes; same pixels and level always give the same bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=level,
                                        compress_type=PNG_STRATEGY, optimize=False)
    return buf.getvalue()


def _empty_rows() -> dict[str, list]:
    return {k: [] for k in ("id", "modality", "text_ids", "image", "visual_tokens", "source", *VIEW_COLUMNS)}


def _append(rows: dict, sample_id, modality, text_ids, image, visual_tokens, source,
            aug_images=None, aug_visual_tokens=None) -> None:  # view columns: read by shard_table if K > 1
    values = (sample_id, modality, text_ids, image, visual_tokens, source, aug_images, aug_visual_tokens)
    for key, value in zip(rows, values):
        rows[key].append(value)


def read_rows(path: str, columns: list[str], start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a Parquet file: only the row groups that hold them are read,
    in record batches through a bounded buffer, so memory holds the rows plus one batch."""
    fs, p = storage.filesystem(path)
    with fs.open_input_file(p) as f:
        pf = pq.ParquetFile(f, buffer_size=READ_BUFFER)
        groups, offset, at = [], 0, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset + n <= start:
                at = offset + n  # the first row of the first group read
            elif offset < stop:
                groups.append(g)
            offset += n
        batches = []
        if groups:
            for batch in pf.iter_batches(batch_size=READ_BATCH, row_groups=groups, columns=columns):
                lo, hi = max(start - at, 0), min(stop - at, batch.num_rows)
                if hi > lo:
                    batches.append(batch.slice(lo, hi - lo))
                at += batch.num_rows
                if at >= stop:
                    break
        if not batches:
            return pa.schema([pf.schema_arrow.field(c) for c in columns]).empty_table()
        return pa.Table.from_batches(batches)


def _num_rows(path: str) -> int:
    fs, p = storage.filesystem(path)
    return pq.read_metadata(p, filesystem=fs).num_rows


def _output_metadata(path: str) -> dict:
    """{"fingerprint", "stats"} stored in a finished unit output; {} if none (or unreadable)."""
    if not storage.exists(path):
        return {}
    fs, p = storage.filesystem(path)
    try:
        with fs.open_input_file(p) as f:
            record = (pq.read_schema(f).metadata or {}).get(METADATA_KEY)
        return json.loads(record) if record else {}
    except (OSError, ValueError):  # unreadable leftovers are redone
        return {}


def _remove_stale(out_dir: str, expected: set[str]) -> None:
    """Delete outputs that no unit of this run expects (input part gone, other row ranges)
    and temp files of killed writes."""
    for kind in MODALITIES:
        for path in storage.list_files(storage.join(out_dir, kind)):
            if path not in expected:
                fs, p = storage.filesystem(path)
                if fs.get_file_info(p).type == pafs.FileType.File:
                    fs.delete_file(p)
    storage.remove_temp_files(out_dir)
