"""tokenize's Ray Data actor: both tokenizers loaded once per actor, one unit (a row range
of a cleaned part) in, one tokenized unit file out; the package docstring gives the rules."""
from __future__ import annotations

import hashlib
import io
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.text_tokenizer import TextTokenizer
from pipelines.common import storage
from pipelines.common.augment import augmented_views
from pipelines.common.ray_session import release_freed_heap
from pipelines.common.schema import VIEW_COLUMNS, shard_table
from pipelines.tokenize import METADATA_KEY, PNG_STRATEGY, STAT_KEYS, TokenizeConfig

COLUMNS = {"text": ["id", "text", "source"], "image": ["id", "image", "source"],
           "pair": ["id", "image", "source", "caption"]}  # what each kind's unit reads of its part
READ_BATCH = 256        # rows per record batch when reading a unit (also how rows before it are skipped)
READ_BUFFER = 1 << 20   # Parquet pages stream through this buffer: a huge row group is never read whole


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
