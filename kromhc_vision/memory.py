"""Activation memory of a training step, measured the same way on every device.

On CPU the process's peak RSS is dominated by the libraries and says little about a model; what a connection
variant adds is the tensors autograd keeps for the backward pass, which :func:`saved_activation_bytes` counts,
and the tensors alive at once during the step, whose largest total :func:`peak_step_bytes` finds.
"""
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import recompute


def saved_activation_bytes(model: torch.nn.Module, *inputs) -> int:
    """Bytes of the tensors autograd saves during ``model(*inputs)``, each storage counted once, parameters excluded.

    Tensors kept by ``hc_recompute``'s segments (whose saved-tensor hooks, nested inside these, see the
    connections' saves first) are counted through :data:`kromhc_vision.recompute._keep_observers`; its
    placeholders hold no tensor data.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    recompute._keep_observers.append(pack)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(*inputs)
    finally:
        recompute._keep_observers.remove(pack)
    return sum(storages.values())


class _LiveStorages(TorchDispatchMode):
    """Tracks the storages of every op's outputs while they live; ``peak`` is the largest total seen."""

    def __init__(self, exclude=()):
        super().__init__()
        self.exclude = set(exclude)
        self.live = {}  # data_ptr -> (StorageWeakRef, nbytes)
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if not ptr or ptr in self.exclude:
                    continue
                entry = self.live.get(ptr)
                if entry is not None and entry[0].expired():  # freed since the last sweep, its address reused
                    self.current -= self.live.pop(ptr)[1]
                    entry = None
                if entry is None:
                    self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.sweep()
        self.peak = max(self.peak, self.current)
        return out

    def sweep(self):
        for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(ptr)[1]


def peak_step_bytes(model: torch.nn.Module, *inputs, loss=lambda out: out.float().square().mean()):
    """``(end of forward, peak during backward)``: bytes of tensor storage alive during ``loss(model(*inputs))``
    and its backward, each storage counted once, parameters and the inputs excluded.

    Every op's outputs are tracked until freed (a dispatch mode, so it counts what autograd saves, what
    ``hc_recompute`` recomputes, gradients and temporaries alike; an op's internal scratch is not seen). On CUDA
    ``torch.cuda.max_memory_allocated`` measures the same kind of peak by the allocator. The model's gradients
    are set to None first, so that the backward allocates them.
    """
    model.zero_grad(set_to_none=True)
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    exclude |= {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    mode = _LiveStorages(exclude)
    with mode:
        value = loss(model(*inputs))
        mode.sweep()
        after_forward = mode.current
        mode.peak = mode.current
        value.backward()
    model.zero_grad(set_to_none=True)
    return after_forward, mode.peak
