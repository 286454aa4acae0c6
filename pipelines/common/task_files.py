"""Building the pretraining task, and its files: the task spec and the exported model.

A *task spec* (task.json) says everything needed to rebuild a PretrainTask: the backbone
config, the vocabularies, the special ids and the masking. Checkpoints and the exported
model directory both carry it, so evaluation rebuilds exactly what was trained.

Exported model directory (``pretrain.out_dir``):
    config.json + model.safetensors   backbone, model.checkpoint.save_pretrained
    heads.safetensors                 MLM/MIM heads (``text.proj.weight``, ``image.proj.weight``)
    task.json                         the task spec
    beit3_official.pth                {'model': state dict in the official unilm/beit3 layout}
                                      (released variant only; text table padded to 64010 rows)
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
from safetensors.torch import load_file, save_file

from model.beit3 import BEiT3
from model.checkpoint import OFFICIAL_TEXT_ROWS, export_official_beit3, load_pretrained, save_pretrained
from model.config import BEiT3Config, beit3_preset
from model.task import MaskingConfig, PretrainTask

TASK_FILE = "task.json"
HEADS_FILE = "heads.safetensors"
OFFICIAL_FILE = "beit3_official.pth"


def task_spec(cfg, text: dict, visual_vocab_size: int) -> dict:
    """The spec of the task a PretrainConfig trains. ``text``: vocab_size and special ids."""
    overrides = dict(cfg.model.overrides)
    for key, param in (("drop_path", "drop_path"), ("checkpoint_activations", "activation_checkpointing")):
        if key in overrides:
            raise ValueError(f"pretrain.model.overrides.{key}: set pretrain.{param} instead")
    overrides.setdefault("vocab_size", text["vocab_size"])
    backbone = beit3_preset(cfg.model.preset, variant=cfg.model.variant, drop_path=cfg.drop_path,
                            checkpoint_activations=cfg.activation_checkpointing, **overrides)
    return {
        "backbone": backbone.to_dict(),
        "text_vocab_size": int(text["vocab_size"]),
        "visual_vocab_size": int(visual_vocab_size),
        "special_ids": [int(text[k]) for k in ("bos_id", "pad_id", "eos_id", "unk_id")],
        "mask_id": int(text["mask_id"]),
        "pad_id": int(text["pad_id"]),
        "masking": dataclasses.asdict(cfg.masking),
    }


def build_task(spec: dict, backbone: BEiT3 | None = None) -> PretrainTask:
    """A PretrainTask from a spec; a fresh backbone (seed the RNG first) unless one is given."""
    if backbone is None:
        backbone = BEiT3(BEiT3Config.from_dict(spec["backbone"]))
    return PretrainTask(backbone, spec["text_vocab_size"], spec["visual_vocab_size"],
                        MaskingConfig(**spec["masking"]), special_ids=spec["special_ids"],
                        mask_id=spec["mask_id"], pad_id=spec["pad_id"])


def write_task_spec(directory: str, spec: dict) -> None:
    with open(os.path.join(directory, TASK_FILE), "w") as f:
        json.dump(spec, f, indent=2, sort_keys=True)


def read_task_spec(directory: str) -> dict:
    with open(os.path.join(directory, TASK_FILE)) as f:
        return json.load(f)


def export_task(task: PretrainTask, spec: dict, out_dir: str, text_rows: int | None = OFFICIAL_TEXT_ROWS) -> bool:
    """A trained PretrainTask -> the exported model directory (see module docstring). The
    official .pth (text table padded to ``text_rows``) exists only for the released
    variant, the architecture of unilm/beit3; returns whether it was written."""
    os.makedirs(out_dir, exist_ok=True)
    save_pretrained(task.model, out_dir)
    save_file({k: v.contiguous() for k, v in task.heads.state_dict().items()}, os.path.join(out_dir, HEADS_FILE))
    write_task_spec(out_dir, spec)
    if task.model.config.variant != "released":
        return False
    torch.save(export_official_beit3(task.model, text_rows), os.path.join(out_dir, OFFICIAL_FILE))
    return True


def load_exported_task(model_dir: str, **backbone_overrides) -> PretrainTask:
    """The PretrainTask (backbone + heads) of an exported model directory."""
    task = build_task(read_task_spec(model_dir), load_pretrained(model_dir, **backbone_overrides))
    task.heads.load_state_dict(load_file(os.path.join(model_dir, HEADS_FILE)), strict=True)
    return task


def random_init_backbone(model_dir: str, seed: int, **backbone_overrides) -> BEiT3:
    """A freshly initialised backbone with the exported model's config (the baseline)."""
    config = dataclasses.replace(BEiT3Config.from_dict(read_task_spec(model_dir)["backbone"]), **backbone_overrides)
    torch.manual_seed(seed)
    return BEiT3(config)
