"""Kernel bodies as C functions: numba ``cfunc`` s that a small parallel kernel calls by address on every thread.

numba compiles the body of a ``prange`` loop into a library of its own, links it into the kernel's module, and
optimises and emits both again: a kernel with large loop bodies took tens of seconds to compile, and the copy numba
caches on disk (the twice-optimised one) ran slower than the first (BENCHMARKS.md ``compile_time``,
``bench_numba_cache``). Here a kernel's body is a C function (``numba.cfunc`` of :data:`BODY_SIGNATURE`, cached on
disk, optimised once), and the kernel that runs it (a launcher: a parallel loop over threads, the same for every
stream count) calls it through its address (:func:`call_body`), passed as an argument: no module links another, and
the launcher stays cacheable (an address compiled in as a constant would keep it out of numba's cache).

A body reads its arguments from an int64 array the launcher fills: sizes, the tensors' addresses (``data_ptr()``),
floats by their bits (:func:`bits_of_float` in Python, ``float_from_bits`` in the body). :func:`launch` is the
launcher of every op whose threads run one body each (``stream_post``, ``sinkhorn``, ``permutation_mix``), its
arguments a tuple of ints (a tuple costs a dispatcher call about what as many int arguments cost; an array made in
Python several times that); ``stream_pre`` has launchers of its own, which make the backward's scratch and run a
second body after the first.

numba's disk cache does not see edits to this file in the kernels of other files that use it (``stream_pre``'s
bodies and launchers): after changing it, touch those files (or clear their ``__pycache__``) so that they compile
again.
"""
import struct

import numba
import numpy as np
from llvmlite import ir as llvm_ir
from numba import types
from numba.extending import intrinsic

from ._exp import _float64_from_bits as float_from_bits  # a float argument from its bits, in a body

__all__ = ["BODY_SIGNATURE", "FAILED", "bits_of_float", "call_body", "float_from_bits", "launch", "run_on_threads"]

# body(thread, args) -> 1: ``thread`` in ``range(threads)``, ``args`` the int64 array its launcher filled. A body
# returns 1 when done; one that raises returns 0 (numba's C wrapper of a cfunc prints the exception, "Exception
# ignored in", and returns the zero it initialised its result with), and its launcher raises FAILED.
BODY_SIGNATURE = types.int64(types.int64, types.CPointer(types.int64))
FAILED = ("a numba kernel body failed on one of its threads, its outputs unwritten; numba printed its error to "
          "stderr ('Exception ignored in ...')")


@intrinsic
def call_body(typingctx, body, thread, args):
    """In a launcher: call the C function at address ``body`` with ``(thread, args)`` (``args``: the address of its
    int64 arguments; the launcher keeps their array alive past the call); its result, 1 when it is done, 0 when it
    raised (:data:`BODY_SIGNATURE`)."""
    if not all(isinstance(a, types.Integer) for a in (body, thread, args)):
        return None

    def codegen(context, builder, signature, llargs):
        i64 = llvm_ir.IntType(64)
        function = llvm_ir.FunctionType(i64, [i64, i64.as_pointer()])
        pointer = builder.inttoptr(llargs[0], function.as_pointer())
        return builder.call(pointer, [builder.sext(llargs[1], i64) if llargs[1].type != i64 else llargs[1],
                                      builder.inttoptr(llargs[2], i64.as_pointer())])

    return types.int64(body, thread, args), codegen


@numba.njit(inline="always")
def run_on_threads(body, threads, args):
    """In a launcher (inlined into it, so that its ``prange`` is the launcher's parallel loop): thread ``p`` of
    ``threads`` calls the body at address ``body`` with ``(p, args)`` (:func:`call_body`); raises :data:`FAILED`
    where a body raised."""
    done = np.zeros(threads, np.int64)
    for p in numba.prange(threads):
        done[p] = call_body(body, p, args)
    if done.sum() != threads:
        raise RuntimeError(FAILED)


def bits_of_float(value: float) -> int:
    """A float argument of a body, as the int64 of its float64 bits (``float_from_bits`` in the body)."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


@numba.njit(parallel=True, cache=True)
def launch(body, threads, args):
    """Run the body at address ``body`` (a ``cfunc`` of :data:`BODY_SIGNATURE`) on ``threads`` threads: thread
    ``p`` calls ``body(p, a)``, ``a`` the int64 array of ``args``, a tuple of ints (sizes, tensors' addresses,
    :func:`bits_of_float`; no bools: a tuple of one type). Compiled once per length of ``args``. Raises
    :data:`FAILED` where a body raised."""
    a = np.empty(len(args), np.int64)
    for i in range(len(args)):
        a[i] = args[i]
    run_on_threads(body, threads, a.ctypes.data)
    return a[0]  # a used after the loop: alive until the bodies have returned
