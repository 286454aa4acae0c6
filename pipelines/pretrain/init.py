"""`pretrain.init_from`: continue pretraining from released weights or an earlier export.

The source is an official unilm/beit3 checkpoint (``.pth``, weights under ``model`` in the
``beit3.*`` layout; task heads in it are ignored) or a project export directory
(``pretrain.out_dir`` of another run: backbone, and its MLM/MIM heads when their shapes
fit). What is not in the source keeps its fresh initialisation: for an official
checkpoint, the pretraining heads. The report lists both, for the log and the metrics.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from model.checkpoint import load_pretrained, official_backbone_state
from model.task import PretrainTask
from pipelines.common.task_files import HEADS_FILE


def source_state(source: str, task: PretrainTask) -> dict[str, torch.Tensor]:
    """The task-state tensors ``source`` provides for ``task`` (backbone under ``model.``,
    heads under ``heads.``)."""
    if os.path.isdir(source):
        backbone = load_pretrained(source).state_dict()
        backbone["text_embed.weight"] = backbone["text_embed.weight"][:task.model.config.vocab_size]
        state = {f"model.{k}": v for k, v in backbone.items()}
        heads = os.path.join(source, HEADS_FILE)
        if os.path.exists(heads):
            own = task.heads.state_dict()
            state |= {f"heads.{k}": v for k, v in load_file(heads).items()
                      if k in own and own[k].shape == v.shape}
        return state
    backbone, _ = official_backbone_state(source, task.model.config)
    return {f"model.{k}": v for k, v in backbone.items()}


def initialize_from(task: PretrainTask, source: str) -> dict:
    """Copy ``source``'s tensors into ``task`` (in place); -> {"source", "loaded", "new"}:
    the task-state keys taken from the source and those left as initialised. Raises naming
    the keys whose shapes differ from the model's."""
    own = task.state_dict()
    state = source_state(source, task)
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    unknown = sorted(set(state) - set(own))
    if wrong or unknown:
        raise ValueError(f"pretrain.init_from {source}: does not fit the model: "
                         + "; ".join(wrong[:8] + [f"unexpected {k}" for k in unknown[:8]]))
    task.load_state_dict(state, strict=False)
    return {"source": source, "loaded": sorted(state), "new": sorted(set(own) - set(state))}
