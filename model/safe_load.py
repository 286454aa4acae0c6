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


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint's ``.metadata`` (dataclasses describing the
    saved tensors) and refuses every other global, so a crafted file cannot run code."""

    def find_class(self, module: str, name: str):
        if module.startswith("torch.distributed.checkpoint."):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                                (torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        if (module, name) in {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                              ("builtins", "slice"), ("torch.serialization", "_get_layout"),
                              ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in checkpoint metadata")


def load_dcp_metadata(path):
    """The ``Metadata`` of a torch.distributed.checkpoint folder's ``.metadata`` file, read
    with :class:`_MetadataUnpickler` (torch's own reader unpickles it without limits)."""
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{_name(path)}: refused to load: the checkpoint metadata holds objects other than "
            f"torch.distributed.checkpoint's own, which could execute code ({err})") from err


def safe_dcp_reader(path: str):
    """A torch.distributed.checkpoint FileSystemReader for ``path`` whose metadata is read
    by :func:`load_dcp_metadata` (tensor data is read with ``weights_only`` by torch). The
    metadata is read here, once, so a refusal is raised as is, not wrapped by DCP."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    checked = load_dcp_metadata(os.path.join(path, ".metadata"))

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            metadata = checked if rank is None else load_dcp_metadata(
                os.path.join(str(self.path), f"__{rank}.metadata"))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)
