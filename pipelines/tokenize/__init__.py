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
and the VQ-KD model once per actor and tokenizes one unit per call (actor.py), reading only
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

import json
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from model.text_tokenizer import MODEL_FILE, TextTokenizer
from pipelines.common import storage
from pipelines.common.augment import AugmentConfig
from pipelines.common.configs import check
from pipelines.common.ray_session import RayConfig, ray_session
from pipelines.common.remote_outputs import StageOutput
from pipelines.common.schema import MODALITIES, TOKENIZERS

METADATA_KEY = b"beit3.tokenize"
STAT_KEYS = ("rows_in", "rows_out", "text_tokens", "chunked_docs", "empty_texts", "truncated_captions", "images")
VISUAL_FILES = ("config.json", "model.safetensors")
PNG_STRATEGY = 3   # zlib Z_RLE (see the module docstring); part of every unit's fingerprint


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
    from pipelines.tokenize.actor import PartTokenizer  # the actor module imports this one

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
