"""The per-worker pretraining loop (Ray Train ``train_loop_per_worker``).

Everything random is a function of (seed, step, sample position), never of the
worker count or of how the run was interrupted:
- data order: pipelines.pretrain.data (the step fixes which samples come next);
- masks: text masks seeded by the sample's stream position, image masks drawn for the
  whole global batch from (seed, step) and sliced (data.step_masks), so one
  worker and two workers mask the same sample the same way;
- drop path: the global torch RNG, reseeded from (seed, step, rank) every step.
So a run resumed from its checkpoint at step t repeats the uninterrupted run from t on.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from model.optim import param_groups, warmup_cosine
from model.task import PART_KEYS
from pipelines.common import task_files
from pipelines.common.seeding import mix_seed
from pipelines.common.train_csv import LiveCSV
from pipelines.pretrain.checkpoints import TrainingState, restore_checkpoint, save_sharded_state, write_run_files
from pipelines.pretrain.data import part_counts, split_micro_batches, split_text_part
from pipelines.pretrain.init import initialize_from
from pipelines.pretrain.loader import StepSource, step_loader
from pipelines.pretrain.wrapping import distributed, gradient_sync, wrap_model


def lr_at(step: int, cfg) -> float:
    """Linear warmup to cfg.peak_lr over warmup_steps, then cosine down to min_lr."""
    return warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.peak_lr, cfg.min_lr)


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
        self.spec = task_files.task_spec(cfg, job["text"], job["visual_vocab_size"])
        torch.manual_seed(cfg.seed)  # identical initial weights on every worker
        self.task = task_files.build_task(self.spec)
        self.initialized_from = None
        if cfg.init_from and not resume_dir:  # a resumed run's weights come from its checkpoint
            self.initialized_from = initialize_from(self.task, cfg.init_from)
            if rank == 0:
                log(f"pretrain: init_from {cfg.init_from}: loaded {len(self.initialized_from['loaded'])} tensors, "
                    f"new (initialised here): {', '.join(self.initialized_from['new']) or 'none'}")
        self.task = self.task.to(device)
        self.model = wrap_model(StepModule(self.task), self.task.model.layers, cfg, device)
        self.optimizer = torch.optim.AdamW(param_groups(self.task, cfg.weight_decay), lr=cfg.peak_lr,
                                           betas=cfg.betas, eps=cfg.eps)
        self.step, self.history, self.samples, self.elapsed = 0, [], [], 0.0
        self.resumed_from = 0
        if resume_dir:
            self._restore(resume_dir)
        source = StepSource(job["index"], cfg.batch.as_dict(), cfg.seed, rank, world_size, self.task.masker,
                            job["text"]["pad_id"], cfg.log_samples)
        self.loader = step_loader(source, cfg.loader_workers)

    def _restore(self, directory: str) -> None:
        training = restore_checkpoint(directory, self.job["run_name"], self.model, self.optimizer)
        self.step = self.resumed_from = int(training.state["step"])
        self.elapsed = float(training.state["elapsed_s"])
        self.history, self.samples = training.history, training.samples
        self.initialized_from = training.state.get("init_from")
        if self.rank == 0:
            log(f"pretrain: resumed run {self.job['run_name']} at step {self.step}/{self.cfg.steps}")

    # ------------------------------------------------------------------ training
    def run(self) -> None:
        cfg = self.cfg
        if self.rank == 0 and self.step == 0:
            params = sum(p.numel() for p in self.task.parameters())
            log(f"pretrain: run {self.job['run_name']}: {params / 1e6:.1f}M parameters, {cfg.steps} steps of "
                f"{cfg.batch.as_dict()} on {self.world_size} worker(s), peak lr {cfg.peak_lr:.3g}")
        live = LiveCSV(self.job.get("live_csv") if self.rank == 0 else None, self.history)
        try:
            while self.step < cfg.steps:
                row = self._train_step(self.step)
                self.step += 1
                self.history.append(row)
                live.append(row)
                if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    log(log_line(row, cfg.steps))
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self._checkpoint()
        finally:
            self.loader.close()

    def _train_step(self, step: int) -> dict:
        cfg, started = self.cfg, time.perf_counter()
        batch, masks, ids, tokens = self.loader.get(step, cfg.steps)
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(mix_seed(cfg.seed, step, self.rank))  # drop path
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) \
            if cfg.bf16 and self.device.type == "cuda" else contextlib.nullcontext()
        step_counts, outs = part_counts(masks), []
        micro_batches = split_micro_batches(batch, masks, cfg.grad_accum_steps)
        for j, (micro, micro_masks) in enumerate(micro_batches):
            pieces = [(b.to(self.device), m.to(self.device))
                      for b, m in split_text_part(micro, micro_masks, cfg.text_chunks)]
            # gradients are all-reduced once, after the last micro-batch's backward
            with gradient_sync(self.model, j == len(micro_batches) - 1), autocast:
                loss, piece_outs = self.model(pieces, step_counts)
            loss.backward()
            outs += piece_outs
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
        if distributed():
            dist.all_reduce(vector)
        vector = vector.tolist()
        parts = {key: vector[3 * i:3 * i + 3] for i, key in enumerate(PART_KEYS)}
        return {"parts": parts, "tokens": vector[-2], "samples": vector[-1]}

    def _gather(self, ids: list[str]) -> list[str]:
        if not distributed():
            return ids
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, ids)
        return [i for part in gathered for i in part]

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> None:
        """Every worker writes its shard of the state into a folder of its own and reports it
        (Ray Train merges the folders); rank 0 adds the run's files."""
        metrics = {k: v for k, v in self.history[-1].items() if v is not None}
        directory = tempfile.mkdtemp(prefix="pretrain-ckpt-")
        try:
            save_sharded_state(directory, self.model, self.optimizer)
            if self.rank == 0:
                state = {"run_name": self.job["run_name"], "step": self.step, "steps": self.cfg.steps,
                         "elapsed_s": self.elapsed, "resumed_from_step": self.resumed_from,
                         "world_size": self.world_size, "init_from": self.initialized_from}
                write_run_files(directory, self.spec, TrainingState(state, self.history, self.samples),
                                self.cfg.log_samples)
            self.report(metrics, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


class StepModule(torch.nn.Module):
    """A micro-batch's forward as one module call, so DDP / FSDP see one forward and one
    backward per micro-batch even though the text part runs as several length-sorted pieces.

    Registers the task's backbone and heads under the task's own names (the state dict is
    the PretrainTask's). The loss is PretrainTask's over the whole step: the mean over the
    parts present of each part's mean cross-entropy, each piece weighting its parts by its
    share of the step's masked positions (``totals``), so the micro-batches' losses add up
    to the loss of the step's batch taken at once.
    """

    def __init__(self, task: torch.nn.Module):
        super().__init__()
        self.model, self.heads = task.model, task.heads
        object.__setattr__(self, "task", task)  # a plain reference: parameters registered once

    def forward(self, pieces: list, totals: dict[str, int] | None = None) -> tuple[torch.Tensor, list]:
        """pieces: [(MixedBatch, PretrainMasks)]; totals: masked positions per part key of the
        whole step (default: of these pieces)."""
        counts = [part_counts(masks) for _, masks in pieces]
        totals = totals or {k: sum(c[k] for c in counts) for k in PART_KEYS}
        present = sum(1 for n in totals.values() if n)
        outs = []
        for (batch, masks), count in zip(pieces, counts):
            weights = {k: n / totals[k] / present for k, n in count.items() if n}
            outs.append(self.task(batch, masks=masks, part_weights=weights))
        return sum(out.loss for out in outs), outs


def log(line: str) -> None:
    """One line to the worker's stdout. Not print(): Ray Train V2 patches print into its
    logger, which then shows every line twice in the driver's output."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def step_row(step: int, totals: dict, lr: float, grad_norm: float, seconds: float, elapsed: float) -> dict:
    """One row of the training log (pretrain.plots_path) from the globally reduced sums."""
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
