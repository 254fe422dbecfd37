"""Helpers shared by the CPU kernels: threads, and the tensors handed to and from the kernels.

Every PyTorch call on the way to a kernel costs about a microsecond, even one that changes nothing
(``to`` the same dtype, ``reshape`` to the same shape, ``view``), and a connection's training step (forward and
backward) runs some fifty arrays through its kernels: these helpers skip the calls that change nothing and
reshape on the NumPy side (~0.15 us). What is gained is measured by ``benchmarks/bench_connection_cpu.py``
(BENCHMARKS.md).
"""
import math
import threading

import numba
import numpy as np
import torch
from numba import types
from numba.core import ir_utils
from numba.extending import intrinsic

_thread_count = threading.local()  # what match_torch_threads last set in this thread (numba's setting is per thread)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call where ``t`` already has ``dtype``."""
    return t if t.dtype == dtype else t.to(dtype)


def kernel_array(t: torch.Tensor, dtype: torch.dtype, *shape: int):
    """``t`` in ``dtype``, contiguous, as a NumPy array of ``shape`` (a view of ``t``'s memory where ``t`` is
    already contiguous in ``dtype``; a copy otherwise). ``-1`` stands for the leading dimensions, as in
    ``reshape``; it is spelled out here, so that tensors of 0 elements work.

    One function, each PyTorch call made only where it changes something: this runs for every array a connection
    hands to its kernels, some fifty per connection and training step. ``detach`` only where ``t`` tracks gradients
    (it makes a new tensor; most of the arrays are outputs and gradients that track nothing)."""
    if t.dtype != dtype:
        t = t.to(dtype)
    if t.requires_grad:
        t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    array = t.numpy()
    if shape and shape[0] == -1:
        rest = math.prod(shape[1:])
        shape = (array.size // rest if rest else 0, *shape[1:])
    return array.reshape(shape)


# A scalar of each compute dtype: the argument that types a kernel taking its tensors as addresses
# (:func:`token_array`), so that numba compiles one specialisation per dtype as it does for arrays.
KERNEL_SCALARS = {torch.float32: np.float32(0), torch.float64: np.float64(0)}


def kernel_tensor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` and C-contiguous, for a kernel that takes its address (``t.data_ptr()``): ``t`` itself
    where it already is, else a copy, which the caller must hold until the kernel returns."""
    if t.dtype != dtype:
        t = t.to(dtype)
    if not t.is_contiguous():
        t = t.contiguous()
    return t


@intrinsic
def _typed_pointer(typingctx, address, like):
    """The integer ``address`` as a pointer to values of ``like``'s type (a float scalar)."""
    if not isinstance(address, types.Integer) or not isinstance(like, types.Float):
        return None
    pointer = types.CPointer(like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen


@numba.njit(inline="always")
def token_array(address, like, shape):
    """Inside a kernel: the C-contiguous array of ``shape`` at ``address`` (a tensor's ``data_ptr()``), of
    ``like``'s dtype. Kernels take tensors as addresses, not NumPy arrays: in a model, where the branches between
    a connection's calls leave the caches cold, making and unboxing NumPy arrays costs each op call tens of
    microseconds (BENCHMARKS.md ``kernel_addresses``). The caller checks every size against ``shape``."""
    return numba.carray(_typed_pointer(address, like), shape)


def _alias_of_the_arguments(lhs, args, alias_map, arg_aliases):
    arg_aliases.add(lhs)


# numba's dead-code elimination in parallel loops takes an array that ``numba.carray`` makes for a kernel to be the
# kernel's own (as ``np.empty``'s): its stores inside a ``prange``, never read back there, were dropped (an
# output of a kernel above left unwritten; tests/ops/test_numba_common.py). The array is the caller's memory:
# registered as aliasing the kernel's arguments, its stores stay.
ir_utils.alias_func_extensions[("carray", "numba")] = _alias_of_the_arguments


def match_torch_threads() -> int:
    """Run the parallel loops on as many threads as PyTorch's intra-op pool; returns that number."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if getattr(_thread_count, "value", None) != threads:  # numba.set_num_threads costs ~10 us a call
        numba.set_num_threads(threads)
        _thread_count.value = threads
    return threads


class PostGradLink:
    """The post step's gradient of the stream state, handed unformed to the pre step's backward.

    The numba pre step returns the state ``X`` again for the post step (an alias: see
    :class:`kromhc_vision.ops.numba.stream_pre.StreamPre`), carrying one of these as the attribute
    :data:`LINK_ATTRIBUTE`. A post step that :meth:`claim` s it returns no gradient for ``X``: its backward
    :meth:`put` s ``(dZ, H_res)`` here instead, and the pre step's backward, which autograd runs after it, adds
    ``H_res^T dZ`` in the pass that forms ``dX``. The post step's backward then writes no ``dX`` (``n C`` values
    per token) and the pre step's reads ``dZ`` where it read that ``dX``: one pass over the stream state fewer.
    Gradients are those of the plain path, to the rounding of the sum's order.

    Only the first post step to claim a link uses it (others return their gradient as usual, which autograd
    sums into ``dX_post``); what is put in one backward pass (graph task) is taken only in the same one, and
    the gradient *of the alias itself* (``torch.autograd.grad`` with respect to it) lacks the claiming post step's
    part: the alias is the post step's input, nothing else's.
    """
    __slots__ = ("claimed", "task", "dZ", "h_res")

    def __init__(self):
        self.claimed = False
        self.task = self.dZ = self.h_res = None

    def claim(self) -> bool:
        """True for the first caller (the post step that will put its gradient here), False after."""
        if self.claimed:
            return False
        self.claimed = True
        return True

    def put(self, dZ: torch.Tensor, h_res: torch.Tensor) -> None:
        """In the claiming post step's backward: its ``dX_next`` and ``H_res`` (``dX = H_res^T dZ``)."""
        self.task, self.dZ, self.h_res = torch._C._current_graph_task_id(), dZ, h_res

    def take(self):
        """``(dZ, H_res)`` put in this backward pass, or None; empty after either way."""
        task, dZ, h_res = self.task, self.dZ, self.h_res
        self.task = self.dZ = self.h_res = None
        if task is None or task != torch._C._current_graph_task_id():
            return None
        return dZ, h_res


LINK_ATTRIBUTE = "_kromhc_post_grad_link"
