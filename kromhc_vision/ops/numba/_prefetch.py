"""Software prefetch for the CPU kernels: ``llvm.prefetch`` from numba, and the next token block's rows a part at
a time.

The pre kernels stream over the stream state a block of tokens at a time, and the first pass over a block's rows
(the projection's first coefficients) waits for them from memory: evidently the hardware prefetchers do not run
far enough ahead of that access pattern (four rows 3 KB apart, page after page). Asking for the next block's rows
while the current one is computed, spread over its coefficient loop, takes 3-19 % off the kernels' time at
ViT-Tiny's width when the caches hold other data, as in a model (BENCHMARKS.md ``pre_prefetch``). A prefetch is a
hint: it changes no value and never faults.

numba's disk cache does not see edits to this file in the kernels that use it (``stream_pre``): after changing
it, touch that file (or clear its ``__pycache__``) so that it compiles again.
"""
import numba
from llvmlite import ir as llvm_ir
from numba.core import cgutils, types
from numba.extending import intrinsic

CACHE_LINE_BYTES = 64
LOCALITY = 2  # llvm.prefetch's: 2 is x86's prefetcht1, into L2 (the setting measured in BENCHMARKS.md pre_prefetch)


@intrinsic
def prefetch(typingctx, array, index):
    """Prefetch (for reading) the cache line of the element at flat ``index`` of the C-contiguous ``array``."""
    if not isinstance(array, types.Array) or array.layout != "C" or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        array_type, index_type = signature.args
        data = context.make_array(array_type)(context, builder, args[0]).data
        address = builder.gep(data, [context.cast(builder, args[1], index_type, types.intp)])
        byte_pointer = llvm_ir.IntType(8).as_pointer()
        i32 = llvm_ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, llvm_ir.FunctionType(llvm_ir.VoidType(), [byte_pointer, i32, i32, i32]), "llvm.prefetch.p0i8")
        # read (0), LOCALITY, data cache (1)
        builder.call(function, [builder.bitcast(address, byte_pointer), i32(0), i32(LOCALITY), i32(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@numba.njit(inline="always")
def part_bounds(span, part, parts, line):
    """``[lo, hi)``: the ``part``-th of ``parts`` consecutive pieces of ``[0, span)``, each a whole number of
    ``line`` s but the last; together they cover ``[0, span)`` once (empty pieces where ``span`` is short)."""
    size = ((span + parts - 1) // parts + line - 1) // line * line
    lo = min(part * size, span)
    return lo, min(lo + size, span)


@numba.njit(inline="always")
def prefetch_part(array, start, span, part, parts):
    """Prefetch the ``part``-th of ``parts`` pieces of the flat elements ``[start, start + span)`` of ``array``
    (``span <= 0``: nothing), one call per line's worth of elements and one for the piece's last element (the
    piece need not start on a cache line's boundary)."""
    line = max(1, CACHE_LINE_BYTES // array.itemsize)
    lo, hi = part_bounds(max(span, 0), part, parts, line)
    for i in range(start + lo, start + hi, line):
        prefetch(array, i)
    if hi > lo:
        prefetch(array, start + hi - 1)
