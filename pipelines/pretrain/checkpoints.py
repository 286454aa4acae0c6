"""Training checkpoint files: what one Ray Train checkpoint directory holds.

    task.safetensors   backbone + heads (full, unsharded state dict)
    optimizer.pt       AdamW state (full), loaded with weights_only
    task.json          the task spec (pipelines.common.task_files)
    metrics.csv        every logged step so far (the rows of pretrain.plots_path)
    samples.jsonl      each step's sample ids, with pretrain.log_samples
    state.json         run name, step, elapsed seconds; written last, so its presence
                       marks a complete checkpoint
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from model.safe_load import load_torch_checkpoint
from pipelines.common import task_files
from pipelines.common.train_csv import csv_text, read_csv

STATE_JSON = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
METRICS_FILE = "metrics.csv"
SAMPLES_FILE = "samples.jsonl"


@dataclass
class TrainingState:
    """What a run carries from one checkpoint to the next besides the weights."""
    state: dict               # state.json: run_name, step, steps, elapsed_s, resumed_from_step, world_size
    history: list[dict]       # metrics rows up to state["step"]
    samples: list[dict]       # per-step sample ids (empty unless log_samples)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state; every rank must call it (FSDP gathers)."""
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_checkpoint(directory: str, model_state: dict, optim_state: dict, spec: dict,
                     training: TrainingState, log_samples: bool) -> None:
    task_files.save_task_state(directory, model_state)
    torch.save(optim_state, os.path.join(directory, OPTIMIZER_FILE))
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
    ``optimizer``; refuse a checkpoint of another run."""
    with open(os.path.join(directory, STATE_JSON)) as f:
        state = json.load(f)
    if state["run_name"] != run_name:
        raise ValueError(f"checkpoint {directory} belongs to run {state['run_name']}, not {run_name}")
    optim = load_torch_checkpoint(os.path.join(directory, OPTIMIZER_FILE))  # weights_only
    set_state_dict(model, optimizer, model_state_dict=task_files.load_task_state(directory),
                   optim_state_dict=optim, options=StateDictOptions(full_state_dict=True))
    step = int(state["step"])
    history = [r for r in read_csv(os.path.join(directory, METRICS_FILE)) if r["step"] <= step]
    samples = []
    if os.path.exists(os.path.join(directory, SAMPLES_FILE)):
        with open(os.path.join(directory, SAMPLES_FILE)) as f:
            samples = [json.loads(line) for line in f]
    return TrainingState(state, history, samples)
