"""Small arrays on the stack for the CPU kernels, so that LLVM keeps their values in registers.

A kernel that vectorises across tokens wants each token's few values (a Sinkhorn iterate's ``n^2`` entries) in
scalar variables: loaded once, computed on, stored once. numba has no fixed-size local arrays on CPU, and
``np.empty`` allocates on the heap (a call, and memory LLVM cannot promote). :func:`stack_pointer` allocates in the
calling function's frame (``alloca``, in its entry block); wrapped by ``numba.carray`` and indexed only at indices
that are constant once the loops over them unroll, LLVM's SROA turns its elements into scalars.

numba's disk cache does not see edits to this file in the kernels that use it (``sinkhorn``): after changing
it, touch that file (or clear its ``__pycache__``) so that it compiles again.
"""
from numba.core import cgutils, types
from numba.extending import intrinsic


@intrinsic
def stack_pointer(typingctx, size, dtype):
    """A pointer to ``size`` (a compile-time constant) values of ``dtype`` in the calling function's frame;
    ``numba.carray(stack_pointer(size, a.dtype), size)`` is the array. Uninitialised; valid while the function runs."""
    if not isinstance(size, types.IntegerLiteral) or not isinstance(dtype, (types.DType, types.NumberClass)):
        return None
    scalar = dtype.dtype

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(scalar), size=size.literal_value)

    return types.CPointer(scalar)(size, dtype), codegen
