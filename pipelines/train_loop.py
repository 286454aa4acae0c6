"""The per-worker pretraining loop (Ray Train ``train_loop_per_worker``).

Everything random is a function of (seed, step, sample position), never of the
worker count or of how the run was interrupted:
- data order: pipelines.pretrain_data (the step fixes which samples come next);
- masks: text masks seeded by the sample's stream position, image masks drawn for the
  whole global batch from (seed, step) and sliced (pretrain_data.step_masks), so one
  worker and two workers mask the same sample the same way;
- drop path: the global torch RNG, reseeded from (seed, step, rank) every step.
So a run resumed from its checkpoint at step t repeats the uninterrupted run from t on.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from model.safe_load import load_torch_checkpoint
from model.task import PART_KEYS
from pipelines import pretrain_model as pm
from pipelines.pretrain_data import MixedStream, StepLoader, mix_seed, split_text_part

NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "logit_scale")
CSV_FIELDS = ["step", "loss", *[f"loss_{p}" for p in ("text_mlm", "image_mim", "pair_mlm", "pair_mim")],
              *[f"acc_{p}" for p in ("text_mlm", "image_mim", "pair_mlm", "pair_mim")],
              "lr", "grad_norm", "samples_per_s", "tokens_per_s", "elapsed_s"]


def lr_at(step: int, cfg) -> float:
    """Linear warmup to cfg.peak_lr over warmup_steps, then cosine down to min_lr."""
    peak, floor = cfg.peak_lr, min(cfg.min_lr, cfg.peak_lr)
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(task: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for biases, norms, tokens and position tables (BEiT's rule)."""
    decay, no_decay = [], []
    for name, p in task.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or any(n in name for n in NO_DECAY_NAMES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]




def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class PretrainLoop:
    """One worker's share of a pretraining run: resume, train, checkpoint, log.

    job: the driver's dict (cfg, index, run_name, text, visual_vocab_size).
    report(metrics, checkpoint_dir or None): called at every checkpoint step by every
    worker (Ray Train's report is a barrier); checkpoint_dir is set on rank 0 only.
    resume_dir: the latest checkpoint's directory, or None for a fresh run.
    """

    def __init__(self, job: dict, rank: int, world_size: int, device: torch.device,
                 report: Callable[[dict, str | None], None], resume_dir: str | None):
        self.cfg = cfg = job["cfg"]
        self.job, self.rank, self.world_size, self.device, self.report = job, rank, world_size, device, report
        self.spec = pm.task_spec(cfg, job["text"], job["visual_vocab_size"])
        torch.manual_seed(cfg.seed)  # identical initial weights on every worker
        self.task = pm.build_task(self.spec).to(device)
        self.model = self._wrap(StepModule(self.task))
        self.optimizer = torch.optim.AdamW(param_groups(self.task, cfg.weight_decay), lr=cfg.peak_lr,
                                           betas=cfg.betas, eps=cfg.eps)
        self.step, self.history, self.samples, self.elapsed = 0, [], [], 0.0
        self.resumed_from = 0
        if resume_dir:
            self._restore(resume_dir)
        stream = MixedStream(job["index"], cfg.batch.as_dict(), cfg.seed, rank, world_size)
        self.loader = StepLoader(stream, self.task.masker, job["text"]["pad_id"], cfg.seed, cfg.log_samples)

    # ------------------------------------------------------------------ setup
    def _wrap(self, task: torch.nn.Module) -> torch.nn.Module:
        cfg = self.cfg
        if cfg.compile:
            for layer in task.model.layers:
                layer.compile(dynamic=True)
        if not _distributed():
            return task
        if cfg.strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            bf16 = cfg.bf16 and self.device.type == "cuda"
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                          reduce_dtype=torch.float32)
            for layer in task.model.layers:
                fully_shard(layer, mp_policy=policy)
            return fully_shard(task, mp_policy=policy)
        from torch.nn.parallel import DistributedDataParallel

        # A modality with no samples leaves its experts/head without gradients.
        unused = min(cfg.batch.as_dict().values()) == 0
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(task, device_ids=ids, find_unused_parameters=unused)

    def _restore(self, directory: str) -> None:
        with open(os.path.join(directory, "state.json")) as f:
            state = json.load(f)
        if state["run_name"] != self.job["run_name"]:
            raise ValueError(f"checkpoint {directory} belongs to run {state['run_name']}, "
                             f"not {self.job['run_name']}")
        optim = load_torch_checkpoint(os.path.join(directory, "optimizer.pt"))  # weights_only
        set_state_dict(self.model, self.optimizer, model_state_dict=pm.load_task_state(directory),
                       optim_state_dict=optim, options=StateDictOptions(full_state_dict=True))
        self.step = self.resumed_from = int(state["step"])
        self.elapsed = float(state["elapsed_s"])
        self.history = [r for r in read_csv(os.path.join(directory, "metrics.csv")) if r["step"] <= self.step]
        samples = os.path.join(directory, "samples.jsonl")
        if os.path.exists(samples):
            with open(samples) as f:
                self.samples = [json.loads(line) for line in f]
        if self.rank == 0:
            log(f"pretrain: resumed run {self.job['run_name']} at step {self.step}/{self.cfg.steps}")

    # ------------------------------------------------------------------ training
    def run(self) -> None:
        cfg = self.cfg
        if self.rank == 0 and self.step == 0:
            params = sum(p.numel() for p in self.task.parameters())
            log(f"pretrain: run {self.job['run_name']}: {params / 1e6:.1f}M parameters, {cfg.steps} steps of "
                f"{cfg.batch.as_dict()} on {self.world_size} worker(s), peak lr {cfg.peak_lr:.3g}")
        try:
            while self.step < cfg.steps:
                row = self._train_step(self.step)
                self.step += 1
                self.history.append(row)
                if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    log(log_line(row, cfg.steps))
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self._checkpoint()
        finally:
            self.loader.close()

    def _train_step(self, step: int) -> dict:
        cfg, started = self.cfg, time.perf_counter()
        batch, masks, ids, tokens = self.loader.get(step, cfg.steps)
        batch, masks = batch.to(self.device), masks.to(self.device)
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(mix_seed(cfg.seed, step, self.rank))  # drop path
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) \
            if cfg.bf16 and self.device.type == "cuda" else contextlib.nullcontext()
        with autocast:
            loss, outs = self.model(split_text_part(batch, masks, cfg.text_chunks))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.task.parameters(), cfg.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals = self._reduce(outs, tokens, batch.num_samples)
        if ids is not None:
            self.samples.append({"step": step + 1, "ids": self._gather(ids)})
        seconds = time.perf_counter() - started
        self.elapsed += seconds
        return step_row(step + 1, totals, lr, float(grad_norm), seconds, self.elapsed)

    def _reduce(self, outs: list, tokens: int, samples: int) -> dict:
        """Global sums over workers and pieces: per part (loss*count, acc*count, count), tokens, samples."""
        zero = torch.zeros((), device=self.device)
        values = []
        for key in PART_KEYS:
            counts = [out.counts.get(key, zero).float().to(self.device) for out in outs]
            values += [sum((out.losses.get(key, zero) * c for out, c in zip(outs, counts)), zero),
                       sum((out.accuracies.get(key, zero) * c for out, c in zip(outs, counts)), zero),
                       sum(counts, zero)]
        values += [torch.tensor(float(tokens), device=self.device), torch.tensor(float(samples), device=self.device)]
        vector = torch.stack([v.float().reshape(()) for v in values])
        if _distributed():
            dist.all_reduce(vector)
        vector = vector.tolist()
        parts = {key: vector[3 * i:3 * i + 3] for i, key in enumerate(PART_KEYS)}
        return {"parts": parts, "tokens": vector[-2], "samples": vector[-1]}

    def _gather(self, ids: list[str]) -> list[str]:
        if not _distributed():
            return ids
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, ids)
        return [i for part in gathered for i in part]

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> None:
        """Every worker takes part (FSDP gathers full state); rank 0 writes the files."""
        model_state, optim_state = get_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        metrics = {k: v for k, v in self.history[-1].items() if v is not None}
        if self.rank != 0:
            self.report(metrics, None)
            return
        directory = tempfile.mkdtemp(prefix="pretrain-ckpt-")
        try:
            self._write_checkpoint(directory, model_state, optim_state)
            self.report(metrics, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _write_checkpoint(self, directory: str, model_state: dict, optim_state: dict) -> None:
        pm.save_task_state(directory, model_state)
        torch.save(optim_state, os.path.join(directory, "optimizer.pt"))
        pm.write_task_spec(directory, self.spec)
        with open(os.path.join(directory, "metrics.csv"), "w") as f:
            f.write(csv_text(self.history))
        if self.cfg.log_samples:
            with open(os.path.join(directory, "samples.jsonl"), "w") as f:
                f.writelines(json.dumps(s) + "\n" for s in self.samples)
        state = {"run_name": self.job["run_name"], "step": self.step, "steps": self.cfg.steps,
                 "elapsed_s": self.elapsed, "resumed_from_step": self.resumed_from,
                 "world_size": self.world_size}
        with open(os.path.join(directory, "state.json"), "w") as f:  # last: marks a complete checkpoint
            json.dump(state, f, indent=2)


class StepModule(torch.nn.Module):
    """A training step's forward as one module call, so DDP / FSDP see one forward and one
    backward per step even though the text part runs as several length-sorted pieces.

    Registers the task's backbone and heads under the task's own names (the state dict is
    the PretrainTask's). The loss is PretrainTask's: the mean over the parts present of each
    part's mean cross-entropy; the text part's mean is recombined from its pieces by count.
    """

    def __init__(self, task: torch.nn.Module):
        super().__init__()
        self.model, self.heads = task.model, task.heads
        object.__setattr__(self, "task", task)  # a plain reference: parameters registered once

    def forward(self, pieces: list) -> tuple[torch.Tensor, list]:
        outs = [self.task(batch, masks=masks) for batch, masks in pieces]
        text = [(out.loss, float(out.counts["text_mlm"])) for out in outs if "text_mlm" in out.counts]
        others = [out for out in outs if "text_mlm" not in out.counts]
        text_total = sum(n for _, n in text)
        terms = [out.loss * len(out.losses) for out in others]  # a piece's loss = mean over its parts
        parts = sum(len(out.losses) for out in others)
        if text_total:
            terms.append(sum(loss * (n / text_total) for loss, n in text))
            parts += 1
        if not parts:  # nothing masked anywhere: the task's zero, still connected to the graph
            return sum(out.loss for out in outs), outs
        return sum(terms) / parts, outs


def log(line: str) -> None:
    """One line to the worker's stdout. Not print(): Ray Train V2 patches print into its
    logger, which then shows every line twice in the driver's output."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def step_row(step: int, totals: dict, lr: float, grad_norm: float, seconds: float, elapsed: float) -> dict:
    """One row of plots/pretrain.csv from the globally reduced sums."""
    row = {"step": step, "lr": lr, "grad_norm": grad_norm, "elapsed_s": elapsed,
           "samples_per_s": totals["samples"] / seconds, "tokens_per_s": totals["tokens"] / seconds}
    means = []
    for key, (loss_sum, acc_sum, count) in totals["parts"].items():
        row[f"loss_{key}"] = loss_sum / count if count else None
        row[f"acc_{key}"] = acc_sum / count if count else None
        if count:
            means.append(loss_sum / count)
    row["loss"] = sum(means) / len(means) if means else None  # PretrainTask's rule: mean over parts
    return row


def log_line(row: dict, steps: int) -> str:
    parts = " ".join(f"{k} {row[f'loss_{k}']:.3f}/{row[f'acc_{k}']:.2f}"
                     for k in PART_KEYS if row.get(f"loss_{k}") is not None)
    step_s = row["elapsed_s"] / max(1, row["step"])
    eta = (steps - row["step"]) * step_s
    return (f"pretrain step {int(row['step'])}/{steps} | loss {row['loss']:.4f} | loss/acc {parts} | "
            f"lr {row['lr']:.3g} | {row['samples_per_s']:.1f} samples/s {row['tokens_per_s']:.0f} tokens/s | "
            f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("", None) else None for k, v in row.items()} for row in csv.DictReader(f)]


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def _fmt(v) -> str:
    if v is None:
        return ""
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.8g}"


def train_worker(job: dict) -> None:
    """Ray Train V2 entry point: one call per worker."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    cfg = job["cfg"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = cfg.threads_per_worker or max(1, cores // ctx.get_local_world_size())
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step-{int(metrics['step']):08d}")

    checkpoint = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        resume_dir = stack.enter_context(checkpoint.as_directory()) if checkpoint else None
        loop = PretrainLoop(job, ctx.get_world_rank(), ctx.get_world_size(), device, report, resume_dir)
    loop.run()
