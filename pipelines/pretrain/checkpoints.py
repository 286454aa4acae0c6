"""Training checkpoint files: what one Ray Train checkpoint directory holds.

    state/             torch.distributed.checkpoint of model + optimizer: every rank
                       writes its own shard (``__<rank>_0.distcp``; rank 0 also
                       ``.metadata``), so FSDP-sharded state is never gathered on one
                       rank, and a run resumes on any number of workers (DCP reshards)
    task.json          the task spec (pipelines.common.task_files)
    metrics.csv        every logged step so far (the rows of pretrain.plots_path)
    samples.jsonl      each step's sample ids, with pretrain.log_samples
    state.json         run name, step, elapsed seconds; written last by rank 0, so its
                       presence marks a complete checkpoint

Each rank writes its files into a folder of its own and reports it to Ray Train, which
merges the ranks' folders into one checkpoint directory in the run's storage.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from model.safe_load import safe_dcp_reader
from model.task import PretrainTask
from pipelines.common import task_files
from pipelines.common.train_csv import csv_text, read_csv
from pipelines.pretrain.wrapping import distributed

STATE_DIR = "state"
STATE_JSON = "state.json"
METRICS_FILE = "metrics.csv"
SAMPLES_FILE = "samples.jsonl"


@dataclass
class TrainingState:
    """What a run carries from one checkpoint to the next besides the weights."""
    state: dict               # state.json: run_name, step, steps, elapsed_s, resumed_from_step, world_size
    history: list[dict]       # metrics rows up to state["step"]
    samples: list[dict]       # per-step sample ids (empty unless log_samples)


def save_sharded_state(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank calls it (a collective): writes this rank's shard of model and optimizer."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state},
             checkpoint_id=os.path.join(directory, STATE_DIR), no_dist=not distributed())


def write_run_files(directory: str, spec: dict, training: TrainingState, log_samples: bool) -> None:
    """Rank 0's share: the task spec, the log, the samples, then state.json."""
    task_files.write_task_spec(directory, spec)
    with open(os.path.join(directory, METRICS_FILE), "w") as f:
        f.write(csv_text(training.history))
    if log_samples:
        with open(os.path.join(directory, SAMPLES_FILE), "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in training.samples)
    with open(os.path.join(directory, STATE_JSON), "w") as f:  # last: marks a complete checkpoint
        json.dump(training.state, f, indent=2)


def restore_checkpoint(directory: str, run_name: str, model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer) -> TrainingState:
    """Load the checkpoint's weights and optimizer state into (the wrapped) ``model`` and
    ``optimizer``, resharded to this run's workers; refuse a checkpoint of another run."""
    with open(os.path.join(directory, STATE_JSON)) as f:
        state = json.load(f)
    if state["run_name"] != run_name:
        raise ValueError(f"checkpoint {directory} belongs to run {state['run_name']}, not {run_name}")
    model_state, optim_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, storage_reader=safe_dcp_reader(os.path.join(directory, STATE_DIR)), no_dist=not distributed())
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    step = int(state["step"])
    history = [r for r in read_csv(os.path.join(directory, METRICS_FILE)) if r["step"] <= step]
    samples = []
    if os.path.exists(os.path.join(directory, SAMPLES_FILE)):
        with open(os.path.join(directory, SAMPLES_FILE)) as f:
            samples = [json.loads(line) for line in f]
    return TrainingState(state, history, samples)


def task_from_checkpoint(directory: str) -> PretrainTask:
    """The trained PretrainTask of a training checkpoint, gathered in this process (CPU,
    float32; no process group needed)."""
    task = task_files.build_task(task_files.read_task_spec(directory))
    loaded = {"model": task.state_dict()}
    dcp.load(loaded, storage_reader=safe_dcp_reader(os.path.join(directory, STATE_DIR)), no_dist=True)
    task.load_state_dict(loaded["model"], strict=True)
    return task


def export_from_checkpoint(ckpt_dir: str, out_dir: str, text_rows: int | None = task_files.OFFICIAL_TEXT_ROWS) -> bool:
    """Training checkpoint -> the exported model directory (pipelines.common.task_files);
    whether the official .pth was written (released variant only)."""
    return task_files.export_task(task_from_checkpoint(ckpt_dir), task_files.read_task_spec(ckpt_dir), out_dir,
                                  text_rows)
