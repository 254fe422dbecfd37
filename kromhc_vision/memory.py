"""Activation memory of a training step, measured the same way on every device.

On CPU the process's peak RSS is dominated by the libraries and says little about a model; what a connection
variant adds is the tensors autograd keeps for the backward pass, which :func:`saved_activation_bytes` counts.
"""
import torch


def saved_activation_bytes(model: torch.nn.Module, *inputs) -> int:
    """Bytes of the tensors autograd saves during ``model(*inputs)``, each storage counted once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return sum(storages.values())
