"""``exp`` on ``x <= 0`` as arithmetic that LLVM vectorises, for the softmaxes and sigmoids of the CPU kernels.

numba compiles ``math.exp`` to a call of the C library's ``exp`` (``expf`` in float32), one scalar call per value
inside loops that are otherwise vectorised. :func:`exp_nonpositive` computes the same function with
``x = k ln 2 + r`` (Cody and Waite's two-part ``ln 2``: ``k ln2_hi`` is exact for the ``|k| <= 1021`` used here),
``exp(r)`` by its Taylor polynomial of degree 13 on ``|r| <= ln(2) / 2`` (truncation below 1e-17) and ``2^k`` built
from its bits, in float64: within an ulp of libm's ``exp`` (``tests/ops/test_numba_permutation_mix.py``), so a float32
result rounded from it is as close as ``expf``'s or closer.

numba's disk cache does not see edits to this file in the kernels that inline it (``permutation_mix``,
``sinkhorn``, ``stream_pre``): after changing it, touch those files (or clear their ``__pycache__``) so that they
compile again.
"""
import numba
import numpy as np
from llvmlite import ir as llvm_ir
from numba.core import types
from numba.extending import intrinsic

LOG2E, LN2_HI, LN2_LO = 1.4426950408889634, 6.93147180369123816490e-01, 1.90821492927058770002e-10
EXP_MIN = -708.0  # below: 0 (exp < 2^-1021, off by under 5e-308; above, 2^k is a normal number)


@intrinsic
def _float64_from_bits(typingctx, bits):
    """The float64 whose bit pattern is the int64 ``bits``."""
    if bits != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.DoubleType())

    return types.float64(types.int64), codegen


@numba.njit(inline="always")
def exp_nonpositive(x):
    """``exp(x)`` in float64 for ``x <= 0`` of any float dtype (NaN for NaN, 0 below ``EXP_MIN`` and for -inf; not
    for ``x > 0``: ``2^k`` overflows its exponent bits above ~709)."""
    x = np.float64(x)
    xc = x if x > EXP_MIN else EXP_MIN  # NaN -> EXP_MIN here: the int conversion below must see a number
    k = np.floor(xc * LOG2E + 0.5)
    r = (xc - k * LN2_HI) - k * LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    y = p * _float64_from_bits((np.int64(k) + 1023) << 52)
    if x >= EXP_MIN:
        return y
    return x if x != x else 0.0
