"""fairscale.nn stand-in: the parity tests never checkpoint or shard torchscale layers."""


def checkpoint_wrapper(module, *args, **kwargs):
    """Identity: torchscale calls it only when checkpoint_activations=True."""
    return module


def wrap(module, *args, **kwargs):
    """Identity: torchscale calls it only when fsdp=True."""
    return module
