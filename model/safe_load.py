"""Load ``.pth`` / ``.pt`` checkpoints without executing code from them.

``torch.load(weights_only=True)`` only unpickles tensors and plain containers;
anything else (a pickle whose reduce calls ``os.system``, say) is refused. This
wraps the refusal in an error that says what happened and what to do.
"""
from __future__ import annotations

import os
import pickle

import torch


class UnsafeCheckpointError(RuntimeError):
    """The checkpoint holds pickled objects beyond tensors and was not loaded."""


def load_torch_checkpoint(path):
    """``torch.load(path, map_location='cpu', weights_only=True)`` with a clear refusal.

    ``path``: a path or a binary file object.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{_name(path)}: refused to load: the file contains pickled objects other than "
            "tensors and plain containers, which could execute code. Load only checkpoints you "
            "trust, re-saved as a plain state dict or as safetensors. "
            f"(torch said: {str(err).splitlines()[0]})"
        ) from err


def _name(path) -> str:
    return os.fspath(path) if isinstance(path, (str, os.PathLike)) else getattr(path, "name", repr(path))
