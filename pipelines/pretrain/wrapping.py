"""Parallelism and compilation applied from outside the model (torchtitan's rule):
per-layer torch.compile, then DDP or FSDP2 when a process group is up."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def wrap_model(module: torch.nn.Module, layers, cfg, device: torch.device) -> torch.nn.Module:
    """``module`` (the step module) ready to train: its transformer ``layers`` compiled when
    cfg.compile, then wrapped for cfg.strategy (ddp | fsdp) in a distributed run."""
    if cfg.compile:
        for layer in layers:
            layer.compile(dynamic=True)
    if not distributed():
        return module
    if cfg.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        bf16 = cfg.bf16 and device.type == "cuda"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for layer in layers:
            fully_shard(layer, mp_policy=policy)
        return fully_shard(module, mp_policy=policy)
    from torch.nn.parallel import DistributedDataParallel

    # A modality with no samples leaves its experts/head without gradients.
    unused = min(cfg.batch.as_dict().values()) == 0
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=unused)


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """A context in which backward all-reduces gradients only when ``enabled``: off for
    every micro-batch but a step's last (DDP's no_sync, FSDP2's requires_gradient_sync)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not enabled:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()
