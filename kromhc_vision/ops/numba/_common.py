"""Helpers shared by the CPU kernels: threads, and the tensors handed to and from the kernels.

Every PyTorch call on the way to a kernel costs about a microsecond even where it changes nothing (``to`` the same
dtype, ``contiguous`` of a contiguous tensor), and many times that in a model, where the branches between a
connection's calls leave the caches cold; a connection's training step (forward and backward) hands some fifty
tensors to its kernels. So the helpers skip the calls that change nothing, and the kernels take each tensor as its
address (``data_ptr()``), viewed inside as an array (:func:`token_array`), not as a NumPy array made per call and
unboxed by numba (BENCHMARKS.md ``kernel_addresses``; ``benchmarks/time_ops_in_model.py`` shows an op's time
beside its kernel's).
"""
import os
import threading

import llvmlite.binding
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


# The NumPy scalar type of each compute dtype: what a body factory takes (``make_body(..., dt)``) to compile a
# kernel for that dtype.
KERNEL_TYPES = {torch.float32: np.float32, torch.float64: np.float64}
# A scalar of each compute dtype: the argument that types a kernel taking its tensors as addresses
# (:func:`token_array`), so that numba compiles one specialisation per dtype as it does for arrays.
KERNEL_SCALARS = {dtype: scalar_type(0) for dtype, scalar_type in KERNEL_TYPES.items()}


def kernel_tensor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` and C-contiguous, for a kernel that takes its address (``t.data_ptr()``): ``t`` itself
    where it already is, else a copy, which the caller must hold until the kernel returns."""
    if t.dtype != dtype:
        t = t.to(dtype)
    if not t.is_contiguous():
        t = t.contiguous()
    return t


def sized_kernel_tensor(op: str, name: str, t: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`kernel_tensor`, after checking that ``t`` holds the ``numel`` values the kernel will read at its
    address (``ValueError`` naming ``op``, the tensor and its shape otherwise)."""
    if t.numel() != numel:
        raise ValueError(f"{op}: {name} of shape {tuple(t.shape)} does not hold {numel} values")
    return kernel_tensor(t, dtype)


@intrinsic
def _typed_pointer(typingctx, address, like):
    """The integer ``address`` as a pointer to values of ``like``'s type (a float or integer scalar)."""
    if not isinstance(address, types.Integer) or not isinstance(like, (types.Float, types.Integer)):
        return None
    pointer = types.CPointer(like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen


VECTOR_WIDTH_CHOICES = ("auto", "256", "512")


def target_features() -> set:
    """The CPU features numba compiles for: ``NUMBA_CPU_FEATURES`` where set, else the host's."""
    flat = numba.config.CPU_FEATURES or llvmlite.binding.get_host_cpu_features().flatten()
    return {f[1:] for f in flat.split(",") if f.startswith("+")}


def vector_width() -> int:
    """The width in bits of the vectors the stream kernels ask LLVM for (:func:`prefer_vector_width`), from
    ``$KROMHC_NUMBA_VECTOR_WIDTH`` (one of :data:`VECTOR_WIDTH_CHOICES`; read when a module's kernels for a stream
    count are first made, so set it before the first forward pass): ``auto`` (the default) is 512 on CPUs with
    AVX-512 and AMX (Intel's Sapphire Rapids and later: the Xeons among this project's machines) and 0, LLVM's own
    choice, elsewhere: 512 bits on AMD's Zen 4, 256 on Intel's earlier AVX-512 CPUs (whose 512-bit code can lower
    the clock, the reason for LLVM's preference).

    On the Xeon LLVM's tuning emits ymm code (numba names that CPU ``rocketlake``), half the vector width of
    the EPYC's and of PyTorch's GEMMs there, for loops of multiply-adds over rows in L1, which wider vectors serve
    where a core has two 512-bit FMA units (BENCHMARKS.md ``vector_width``: not yet measured on a Xeon). Only
    these kernels are affected, not the rest of a process's numba code (``NUMBA_CPU_FEATURES`` would change all of
    it).
    """
    value = os.environ.get("KROMHC_NUMBA_VECTOR_WIDTH", "auto")
    if value not in VECTOR_WIDTH_CHOICES:
        raise ValueError(f"KROMHC_NUMBA_VECTOR_WIDTH={value!r}; valid choices: {', '.join(VECTOR_WIDTH_CHOICES)}")
    if value == "auto":
        return 512 if {"avx512f", "amx-tile"} <= target_features() else 0
    return int(value)


@intrinsic
def prefer_vector_width(typingctx, bits):
    """First in a ``cfunc`` body (:mod:`._launch`; in a ``prange`` kernel: in the kernel and first in each of its
    parallel loops, whose bodies numba compiles as functions of their own): LLVM vectorises that function with
    vectors of ``bits`` bits where the CPU has them (LLVM's function attribute ``prefer-vector-width``; 0: LLVM's
    own choice). ``bits`` must be a compile-time constant (a body factory's closure variable, so that numba's disk
    cache keeps one compilation per width)."""
    if not isinstance(bits, types.IntegerLiteral):
        return None
    width = bits.literal_value

    def codegen(context, builder, signature, args):
        if width:  # a string attribute, which llvmlite's attribute set does not list: added as the set it is
            set.add(builder.function.attributes, f'"prefer-vector-width"="{width}"')
        return context.get_dummy_value()

    return types.void(bits), codegen


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
        """In the claiming post step's backward: its ``dX_next`` and ``H_res`` (``dX = H_res^T dZ``), detached.
        The saved ``H_res`` comes unpacked with its ``grad_fn``, whose graph leads back to the pre step's node, which
        holds this link: a cycle through C++ that Python's collector cannot see, leaking the whole graph (the input,
        every activation) wherever the pre step's backward does not :meth:`take` it (``torch.autograd.grad`` with
        respect to later parameters only, a backward that raised in between)."""
        self.task, self.dZ, self.h_res = torch._C._current_graph_task_id(), dZ.detach(), h_res.detach()

    def take(self):
        """``(dZ, H_res)`` put in this backward pass, or None; empty after either way."""
        task, dZ, h_res = self.task, self.dZ, self.h_res
        self.task = self.dZ = self.h_res = None
        if task is None or task != torch._C._current_graph_task_id():
            return None
        return dZ, h_res


LINK_ATTRIBUTE = "_kromhc_post_grad_link"
