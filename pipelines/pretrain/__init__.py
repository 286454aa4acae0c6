"""pretrain stage: Ray Train V2 TorchTrainer driver for BEiT-3 masked data modeling.

The driver indexes the shards, names the run after everything that shapes the
training trajectory, runs ``pipelines.pretrain.loop.train_worker`` on N workers
and exports the final checkpoint. Resuming is Ray Train V2's: the same
``RunConfig(name, storage_path)`` finds the run's checkpoints and the workers
pick the latest up with ``ray.train.get_checkpoint()``; the data order is a
function of the step (pipelines.pretrain.data), so a resumed run continues at
the exact next sample and repeats the uninterrupted run's loss curve.

Modules: data.py (sample order over the shards, per-sample masks, length-sorted text
pieces), loader.py (builds the next steps' batches: a thread or pretrain.loader_workers
processes), loop.py (the per-worker training loop), wrapping.py (per-layer
torch.compile, then DDP / FSDP2), checkpoints.py (the files of one training checkpoint);
this module is the driver and the config.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model.task import MaskingConfig
from pipelines.common import storage
from pipelines.common.configs import check, to_dict
from pipelines.common.ray_session import RayConfig, ray_session
from pipelines.common.schema import MODALITIES
from pipelines.common.shards import ShardIndex, absolute, read_manifest, split_index
from pipelines.common.task_files import task_spec
from pipelines.common.train_csv import CSV_FIELDS, csv_text, read_csv

# The paper's peak lr (at its batch of 6144), and how far above it a config may go unasked.
PAPER_PEAK_LR = 1e-3
HIGH_LR_FACTOR = 4

# Fields that change how a run executes but not what it computes: a run
# interrupted under one value resumes under another (e.g. more workers).
RUNTIME_FIELDS = frozenset({
    "out_dir", "checkpoint_dir", "plots_path", "keep_checkpoints", "num_workers", "use_gpu",
    "cpus_per_worker", "threads_per_worker", "strategy", "compile", "activation_checkpointing",
    "checkpoint_every", "log_every", "log_samples", "text_chunks", "grad_accum_steps", "max_failures",
    "loader_workers",
})



@dataclass(frozen=True)
class ModelParams:
    """The backbone: ``model.config.beit3_preset(preset, variant, **overrides)``."""

    preset: str = "tiny"
    variant: Literal["released", "paper"] = "released"
    overrides: dict[str, Any] = field(default_factory=dict)
    # codebook size of the visual tokenizer; null = read it from the shard manifest
    visual_vocab_size: int | None = None

    def __post_init__(self):
        check(self.visual_vocab_size is None or self.visual_vocab_size >= 2,
              "pretrain.model.visual_vocab_size: must be >= 2 or null")


@dataclass(frozen=True)
class BatchMix:
    """Global samples per step of each modality (the paper: equal thirds)."""

    text: int = 32
    image: int = 32
    pair: int = 32

    def __post_init__(self):
        for m in MODALITIES:
            check(getattr(self, m) >= 0, f"pretrain.batch.{m}: must be >= 0")
        check(self.total > 0, "pretrain.batch: at least one modality needs samples")

    @property
    def total(self) -> int:
        return self.text + self.image + self.pair

    def as_dict(self) -> dict[str, int]:
        return {m: getattr(self, m) for m in MODALITIES}


@dataclass(frozen=True)
class PretrainConfig:
    out_dir: str = field(kw_only=True)  # the exported model
    lr: float = 1e-3  # peak lr at lr_reference_batch; scaled linearly with the global batch
    allow_high_lr: bool = False  # permit a peak lr above 4x the paper's 1e-3
    init_from: str | None = None  # official unilm/beit3 .pth or a project export: continue pretraining from it
    official_text_rows: int | None = 64010  # text rows of the official .pth export (null: the tokenizer's)
    model: ModelParams = ModelParams()
    steps: int = 800
    batch: BatchMix = BatchMix()
    lr_reference_batch: int = 6144  # the paper: lr 1e-3 at batch 6144
    warmup_steps: int = 10000
    min_lr: float = 1e-5  # end of the cosine decay
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 3.0  # max global grad norm; 0 = off
    drop_path: float = 0.1
    masking: MaskingConfig = MaskingConfig()
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional on small machines, so Ray never deadlocks
    threads_per_worker: int | None = None  # torch threads; null = cores / workers
    loader_workers: int = 1  # per training worker: 1 = a background thread, k > 1 = k loader processes
    strategy: Literal["ddp", "fsdp"] = "ddp"
    bf16: bool = True  # autocast on GPU (CPU runs stay float32)
    compile: bool = False
    activation_checkpointing: bool = False
    text_chunks: int = 4  # the text part runs as this many length-sorted pieces (less padding)
    grad_accum_steps: int = 1  # micro-batches per optimizer step: the global batch needn't fit at once
    checkpoint_every: int = 100
    checkpoint_dir: str = field(kw_only=True)  # Ray Train storage_path
    keep_checkpoints: int = 2
    max_failures: int = 3  # worker-group restarts from the last checkpoint before the run fails
    plots_path: str = field(kw_only=True)
    log_every: int = 10
    log_samples: bool = False  # record every step's sample ids (audits, resume tests)
    seed: int = 0

    def __post_init__(self):
        check(self.lr > 0, "pretrain.lr: must be > 0")
        check(self.steps >= 1, "pretrain.steps: must be >= 1")
        check(self.lr_reference_batch >= 1, "pretrain.lr_reference_batch: must be >= 1")
        check(self.allow_high_lr or self.peak_lr <= HIGH_LR_FACTOR * PAPER_PEAK_LR,
              f"pretrain: the peak lr is {self.peak_lr:.3g} (lr {self.lr:g} x global batch {self.batch.total} / "
              f"lr_reference_batch {self.lr_reference_batch}), {self.peak_lr / PAPER_PEAK_LR:.0f}x the paper's "
              f"{PAPER_PEAK_LR:g}; lower pretrain.lr, raise pretrain.lr_reference_batch (the paper: 6144), "
              "or set pretrain.allow_high_lr: true")
        check(self.official_text_rows is None or self.official_text_rows >= 1,
              "pretrain.official_text_rows: must be >= 1 or null")
        check(0 <= self.warmup_steps, "pretrain.warmup_steps: must be >= 0")
        check(0 <= self.min_lr <= self.lr, "pretrain.min_lr: must be in [0, lr]")
        check(self.weight_decay >= 0, "pretrain.weight_decay: must be >= 0")
        check(all(0 <= b < 1 for b in self.betas), "pretrain.betas: each must be in [0, 1)")
        check(self.eps > 0, "pretrain.eps: must be > 0")
        check(self.grad_clip >= 0, "pretrain.grad_clip: must be >= 0 (0 = off)")
        check(0 <= self.drop_path < 1, "pretrain.drop_path: must be in [0, 1)")
        check(self.num_workers >= 1, "pretrain.num_workers: must be >= 1")
        check(self.cpus_per_worker > 0, "pretrain.cpus_per_worker: must be > 0")
        check(self.threads_per_worker is None or self.threads_per_worker >= 1,
              "pretrain.threads_per_worker: must be >= 1 or null")
        check(self.loader_workers >= 1, "pretrain.loader_workers: must be >= 1")
        check(self.checkpoint_every >= 1, "pretrain.checkpoint_every: must be >= 1")
        check(self.keep_checkpoints >= 1, "pretrain.keep_checkpoints: must be >= 1")
        check(self.max_failures >= -1, "pretrain.max_failures: must be >= 0 (or -1: retry forever)")
        check(self.log_every >= 1, "pretrain.log_every: must be >= 1")
        check(self.text_chunks >= 1, "pretrain.text_chunks: must be >= 1")
        check(self.grad_accum_steps >= 1, "pretrain.grad_accum_steps: must be >= 1")
        for m, n in self.batch.as_dict().items():
            check(n % self.num_workers == 0,
                  f"pretrain.batch.{m}: {n} is not divisible by pretrain.num_workers={self.num_workers}")
            check(n % (self.num_workers * self.grad_accum_steps) == 0,
                  f"pretrain.batch.{m}: {n} is not divisible by num_workers x grad_accum_steps = "
                  f"{self.num_workers * self.grad_accum_steps} (equal micro-batches)")

    @property
    def peak_lr(self) -> float:
        """lr scaled linearly with the global batch (Goyal et al.)."""
        return self.lr * self.batch.total / self.lr_reference_batch

    def run_name(self, index: ShardIndex, text_tokenizer_sha: str) -> str:
        """Names the run after what determines its trajectory (params, data, tokenizer and the
        training code), so a changed lr or a fixed bug starts a new run while an interrupted
        identical one resumes."""
        identity = {k: v for k, v in to_dict(self).items() if k not in RUNTIME_FIELDS}
        text = json.dumps([identity, index.digest(), text_tokenizer_sha, code_digest()], sort_keys=True)
        return "pretrain-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def code_digest() -> str:
    """sha256 of the sources that compute the training trajectory: model/ (the backbone,
    heads, masking), this package, and the shared shard reader, seeds and task files."""
    import model
    from pipelines.common import seeding, shards, task_files

    paths = sorted(str(p) for p in Path(model.__file__).parent.glob("*.py"))
    paths += sorted(str(p) for p in Path(__file__).parent.glob("*.py"))
    paths += [m.__file__ for m in (seeding, shards, task_files)]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes())
    return digest.hexdigest()


def run_pretraining(cfg: PretrainConfig, shards_dir: str, text_tokenizer_dir: str,
                    ray_cfg: RayConfig) -> dict:
    """Train (or resume) on the train shards; export to cfg.out_dir; write cfg.plots_path."""
    started = time.time()
    job = make_job(cfg, shards_dir, text_tokenizer_dir)
    name = job["run_name"]
    with ray_session(ray_cfg):
        result = _fit(cfg, job, name)
    if result.checkpoint is None:
        raise RuntimeError(f"pretraining run {name} ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as ckpt:
        state = json.loads(open(os.path.join(ckpt, "state.json")).read())
        rows = read_csv(os.path.join(ckpt, "metrics.csv"))
        official = export_model(ckpt, cfg.out_dir, cfg.log_samples, cfg.official_text_rows)
    if not official:
        print(f"pretrain: variant {cfg.model.variant}: exported the project's layout (safetensors, config, heads) "
              f"to {cfg.out_dir}; the official .pth exists only for the released variant", flush=True)
    write_csv(cfg.plots_path, rows)
    return summary(cfg, name, state, rows, time.time() - started) | {"official_export": official}


def make_job(cfg: PretrainConfig, shards_dir: str, text_tokenizer_dir: str) -> dict:
    """Everything the workers need, checked before any worker starts."""
    from model.text_tokenizer import TextTokenizer

    shards_dir = absolute(shards_dir)
    manifest = read_manifest(shards_dir)
    index = split_index(shards_dir, "train", manifest)
    tokenizer = TextTokenizer(text_tokenizer_dir)
    visual = manifest_visual_info(manifest)
    vocab = cfg.model.visual_vocab_size or visual.get("n_codes")
    if not vocab:
        raise ValueError(f"{shards_dir}/manifest.json names no visual codebook size "
                         "(tokenizers.visual.n_codes); set pretrain.model.visual_vocab_size")
    job = {"cfg": cfg, "index": index, "run_name": cfg.run_name(index, tokenizer.sha256),
           "live_csv": None if storage.is_uri(cfg.plots_path) else absolute(cfg.plots_path),
           "text": {"vocab_size": tokenizer.vocab_size, **tokenizer.special_ids},
           "visual_vocab_size": int(vocab)}
    text_sha = ((manifest.get("tokenizers") or {}).get("text") or {}).get("sha256")
    if text_sha and text_sha != tokenizer.sha256:
        raise ValueError(f"the shards were tokenized with another text tokenizer than {text_tokenizer_dir} "
                         f"(sha256 {text_sha[:12]} vs {tokenizer.sha256[:12]})")
    backbone = task_spec(cfg, job["text"], job["visual_vocab_size"])["backbone"]
    check_grids(visual, backbone, cfg.model.preset)
    return job


def check_grids(visual: dict, backbone: dict, preset: str) -> None:
    """The model's patch grid must be the visual tokenizer's (the views are resized to the
    model's image size, BEiT v2's two resolutions of one crop; the codes are not)."""
    if not (visual.get("image_size") and visual.get("patch_size")):
        return
    codes = visual["image_size"] // visual["patch_size"]
    model = backbone["image_size"] // backbone["patch_size"]
    if codes != model:
        raise ValueError(
            f"pretrain.model: the {preset} model's patch grid is {model}x{model} (image_size "
            f"{backbone['image_size']}, patch_size {backbone['patch_size']}) but the visual tokenizer's is "
            f"{codes}x{codes} (image_size {visual['image_size']}, patch_size {visual['patch_size']}); set "
            f"pretrain.model.overrides.image_size to {codes} x the patch size")


def manifest_visual_info(manifest: dict) -> dict:
    """The visual tokenizer's facts recorded in the manifest (n_codes, image_size), if any."""
    return dict((manifest.get("tokenizers") or {}).get("visual") or {})


def _fit(cfg: PretrainConfig, job: dict, name: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.pretrain.loop import train_worker

    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=job,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            **checkpoint_storage(cfg.checkpoint_dir),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    return trainer.fit()


def checkpoint_storage(checkpoint_dir: str) -> dict:
    """RunConfig's storage for a local folder or an object-store URI (s3://): Ray Train
    writes and reads the checkpoints through the same pyarrow file system as the stages
    (endpoint and keys from the AWS_* variables)."""
    if not storage.is_uri(checkpoint_dir):
        return {"storage_path": absolute(checkpoint_dir)}
    filesystem, path = storage.filesystem(checkpoint_dir)
    return {"storage_path": path, "storage_filesystem": filesystem}


def export_model(ckpt_dir: str, out_dir: str, with_samples: bool, text_rows: int | None = None) -> bool:
    """Checkpoint -> out_dir: backbone safetensors + config, heads, and (released variant)
    the official layout; returns whether the official .pth was written.

    Written to a sibling temp folder and swapped in, so out_dir is never half-written.
    """
    out = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(out))
    try:
        from pipelines.pretrain.checkpoints import export_from_checkpoint

        official = export_from_checkpoint(ckpt_dir, tmp, text_rows)
        if with_samples:
            shutil.copy2(os.path.join(ckpt_dir, "samples.jsonl"), os.path.join(tmp, "samples.jsonl"))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return official


def write_csv(path: str, rows: list[dict]) -> None:
    storage.write_bytes(path, csv_text(rows).encode())


def summary(cfg: PretrainConfig, name: str, state: dict, rows: list[dict], wall_s: float) -> dict:
    """metrics/pretrain.json: the final losses/accuracies and the throughput."""
    tail = rows[-min(len(rows), 20):]
    mean = lambda key: (sum(r[key] for r in tail if r.get(key) is not None)  # noqa: E731
                        / max(1, sum(r.get(key) is not None for r in tail)))
    return {
        "run_name": name,
        "steps": int(state["step"]),
        "resumed_from_step": int(state.get("resumed_from_step", 0)),
        "global_batch": cfg.batch.as_dict(),
        "peak_lr": cfg.peak_lr,
        "final": {k: round(mean(k), 4) for k in CSV_FIELDS if k.startswith(("loss", "acc"))},
        "steps_per_s": round(mean("samples_per_s") / cfg.batch.total, 3),
        "samples_per_s": round(mean("samples_per_s"), 2),
        "tokens_per_s": round(mean("tokens_per_s"), 1),
        "train_time_s": round(rows[-1]["elapsed_s"], 1) if rows else 0.0,
        "stage_wall_s": round(wall_s, 1),
        "num_workers": cfg.num_workers,
        "model": dataclasses.asdict(cfg.model),
        "init_from": _init_summary(state.get("init_from")),
    }


def _init_summary(report: dict | None) -> dict | None:
    """metrics/pretrain.json's view of pretrain.init_from: the source, how many tensors it
    gave, and which were initialised here (the heads, for an official checkpoint)."""
    if not report:
        return None
    return {"source": report["source"], "loaded": len(report["loaded"]), "new": report["new"]}
