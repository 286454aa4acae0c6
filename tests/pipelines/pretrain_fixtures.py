"""A tiny, real corpus for the pretrain/evaluate tests, built in a temp folder.

Same formats as the pipeline's: a sentencepiece tokenizer trained by the
text_tokenizer stage's own code, SHARD_SCHEMA shards + a pack-style manifest,
a Karpathy retrieval JSON with its PNGs and a classification ImageFolder,
all rendered with pipelines.demo_data.render_scene. Visual tokens are the
quantised mean colour of each patch, so masked image modeling is learnable.
"""
from __future__ import annotations

import io
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model.text_tokenizer import TextTokenizer
from pipelines.common import storage
from pipelines.common.schema import MODALITIES, shard_table
from pipelines.demo_data import render_scene
from pipelines.text_tokenizer import TextTokenizerConfig, train_model, write_tokenizer

IMAGE_SIZE = 32
PATCH = 16
VISUAL_CODES = 8
TINY_MODEL = {"dim": 64, "depth": 2, "num_heads": 2, "ffn_dim": 128, "image_size": IMAGE_SIZE}
WORDS = ("the quick brown fox jumps over a lazy dog while red green blue circles and squares "
         "sit left of right above below large small triangles in the scene").split()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def visual_codes(image: Image.Image) -> list[int]:
    """Per 16x16 patch: 3 bits, one per channel above mid-grey (row-major grid)."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32)
    g = IMAGE_SIZE // PATCH
    means = x.reshape(g, PATCH, g, PATCH, 3).mean(axis=(1, 3)).reshape(-1, 3)
    return [int(r > 100) * 4 + int(gr > 100) * 2 + int(b > 100) for r, gr, b in means]


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + "."


def train_tokenizer(root: str, rng: random.Random) -> TextTokenizer:
    texts = [sentence(rng) for _ in range(300)]
    texts += [render_scene(rng, IMAGE_SIZE)[2] for _ in range(200)]
    corpus = os.path.join(root, "tok_corpus.parquet")
    pq.write_table(pa.table({"text": texts}), corpus)
    model_bytes, _ = train_model(TextTokenizerConfig(out_dir=os.path.join(root, "text_tokenizer"), vocab_size=64),
                                 [(corpus, "text")])
    tokenizer = TextTokenizer.from_bytes(model_bytes)
    write_tokenizer(os.path.join(root, "text_tokenizer"), model_bytes, tokenizer)
    return TextTokenizer(os.path.join(root, "text_tokenizer"))


def make_rows(rng: random.Random, tokenizer: TextTokenizer, modality: str, n: int, prefix: str) -> list[dict]:
    rows = []
    for i in range(n):
        row = {"id": f"{prefix}-{modality}-{i:05d}", "modality": modality, "text_ids": None,
               "image": None, "visual_tokens": None, "source": "fixture"}
        if modality == "text":
            row["text_ids"] = tokenizer.encode(sentence(rng), 64)
        else:
            image, _, caption = render_scene(rng, IMAGE_SIZE)
            row["image"], row["visual_tokens"] = png(image), visual_codes(image)
            if modality == "pair":
                row["text_ids"] = tokenizer.encode(caption, 64)
        rows.append(row)
    return rows


def write_shards(root: str, rng: random.Random, tokenizer: TextTokenizer,
                 train_rows: int, val_rows: int, shard_rows: int) -> str:
    """Mixed-modality shards (train_rows / val_rows per modality) + manifest.json."""
    out, entries = os.path.join(root, "shards"), []
    for split, n in (("train", train_rows), ("val", val_rows)):
        rows = [r for m in MODALITIES for r in make_rows(rng, tokenizer, m, n, split)]
        rng.shuffle(rows)
        for start in range(0, len(rows), shard_rows):
            chunk = rows[start:start + shard_rows]
            rel = f"{split}/shard-{len(entries):05d}.parquet"
            data = storage.write_parquet(shard_table({k: [r[k] for r in chunk] for k in chunk[0]}),
                                         os.path.join(out, rel))
            entries.append({"path": rel, "split": split, "rows": len(chunk), "bytes": len(data),
                            "sha256": storage.sha256(data),
                            "rows_by_modality": {m: sum(r["modality"] == m for r in chunk) for m in MODALITIES}})
    manifest = {"shards": entries, "tokenizers": {"text": {"sha256": tokenizer.sha256},
                                                  "visual": {"n_codes": VISUAL_CODES, "image_size": IMAGE_SIZE,
                                                             "patch_size": PATCH}}}
    storage.write_json(os.path.join(out, "manifest.json"), manifest)
    return out


def write_eval_sets(root: str, rng: random.Random, retrieval: dict[str, int], probe: dict[str, int]) -> str:
    """Karpathy-format retrieval JSON + PNGs, and an ImageFolder labelled by shape."""
    base = os.path.join(root, "eval")
    entries = []
    for split, n in retrieval.items():
        for i in range(n):
            image, labels, caption = render_scene(rng, 48)  # not the model size: eval resizes
            name = f"{split}-{i:05d}.png"
            storage.write_bytes(os.path.join(base, "retrieval", "images", name), png(image))
            entries.append({"filepath": "images", "filename": name, "split": split,
                            "sentences": [{"raw": caption}], "labels": labels})
    storage.write_json(os.path.join(base, "retrieval", "dataset.json"), {"images": entries})
    for split, n in probe.items():
        for i in range(n):
            image, labels, _ = render_scene(rng, 48, num_objects=1)
            storage.write_bytes(os.path.join(base, "classification", split, labels["shape"], f"{i:05d}.png"), png(image))
    return base


def make_corpus(root: str, seed: int = 0, train_rows: int = 48, val_rows: int = 16, shard_rows: int = 40,
                retrieval: dict | None = None, probe: dict | None = None) -> dict:
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    tokenizer = train_tokenizer(root, rng)
    paths = {"text_tokenizer": os.path.join(root, "text_tokenizer"),
             "shards": write_shards(root, rng, tokenizer, train_rows, val_rows, shard_rows)}
    paths["eval"] = write_eval_sets(root, rng, retrieval or {"train": 48, "test": 24},
                                    probe or {"train": 36, "val": 18})
    return paths


def tiny_pretrain_params(root: str, **overrides) -> dict:
    """params.yaml `pretrain` section for the tiny corpus (a plain dict for configs.build)."""
    params = {
        "out_dir": os.path.join(root, "model"), "checkpoint_dir": os.path.join(root, "checkpoints"),
        "plots_path": os.path.join(root, "plots", "pretrain.csv"),
        "lr": 1e-3, "lr_reference_batch": 12, "steps": 8, "warmup_steps": 2,
        "batch": {"text": 4, "image": 4, "pair": 4},
        "model": {"preset": "tiny", "overrides": dict(TINY_MODEL)},
        "drop_path": 0.0, "checkpoint_every": 4, "log_every": 1, "threads_per_worker": 1,
        "cpus_per_worker": 0.5, "seed": 0,
    }
    params.update(overrides)
    return params


# ----------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict:
    """Tokenizer, shards and eval sets, built once per test session."""
    return make_corpus(str(tmp_path_factory.mktemp("tiny_corpus")))


def tiny_job(paths: dict, root: str, **overrides) -> dict:
    """The driver's job dict for an in-process PretrainLoop (no Ray)."""
    from pipelines.common.configs import build
    from pipelines.pretrain import PretrainConfig, make_job

    cfg = build(PretrainConfig, tiny_pretrain_params(root, **overrides), "pretrain")
    return make_job(cfg, paths["shards"], paths["text_tokenizer"])


def train_in_process(job: dict, resume_dir: str | None = None, keep_dir: str | None = None):
    """Run a PretrainLoop in this process; returns (loop, {step: copied checkpoint dir})."""
    import shutil

    import torch

    from pipelines.pretrain.loop import PretrainLoop

    saved = {}

    def report(metrics, directory):
        if directory and keep_dir:
            saved[int(metrics["step"])] = shutil.copytree(directory, os.path.join(keep_dir, f"step-{int(metrics['step'])}"))

    loop = PretrainLoop(job, 0, 1, torch.device("cpu"), report, resume_dir)
    loop.run()
    return loop, saved


def distributed_worker(rank: int, world_size: int, port: int, job: dict, resume_dir: str | None,
                       keep_dir: str, result_path: str) -> None:
    """torch.multiprocessing entry: one rank of a gloo group running a PretrainLoop; rank 0
    copies its checkpoints to keep_dir and writes the loss history to result_path."""
    import json
    import shutil

    import torch
    import torch.distributed as dist

    from pipelines.pretrain.loop import PretrainLoop

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        def report(metrics, directory):
            if directory:
                shutil.copytree(directory, os.path.join(keep_dir, f"step-{int(metrics['step'])}"), dirs_exist_ok=True)
            dist.barrier()

        loop = PretrainLoop(job, rank, world_size, torch.device("cpu"), report, resume_dir)
        loop.run()
        if rank == 0:
            with open(result_path, "w") as f:
                json.dump({"history": loop.history, "samples": loop.samples, "resumed_from": loop.resumed_from}, f)
    finally:
        dist.destroy_process_group()


def run_distributed(job: dict, world_size: int, keep_dir: str, resume_dir: str | None = None) -> dict:
    """Run a PretrainLoop on ``world_size`` local processes (gloo); returns rank 0's result."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.makedirs(keep_dir, exist_ok=True)
    result_path = os.path.join(keep_dir, f"result-{'resumed' if resume_dir else 'fresh'}.json")
    mp.spawn(distributed_worker, args=(world_size, port, job, resume_dir, keep_dir, result_path), nprocs=world_size)
    with open(result_path) as f:
        return json.load(f)
