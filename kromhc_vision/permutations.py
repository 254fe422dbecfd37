"""Permutation matrices and the factorisation of a stream count for KromHC."""
import itertools
import math
from functools import lru_cache

import numpy as np
import torch

# Largest permutation size whose k! coefficient vector we are willing to build (6! = 720).
MAX_PERMUTATION_SIZE = 6


@lru_cache(maxsize=None)
def permutation_table(k: int) -> tuple:
    """The ``k!`` permutations of ``range(k)`` in lexicographic order (index 0: the identity)."""
    return tuple(itertools.permutations(range(k)))


def permutation_matrices(k: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """All ``k!`` permutation matrices of size k, shape ``(k!, k, k)``; index 0 is the identity.

    Matrix ``p`` maps row ``i`` to column ``perm_p[i]``: ``P[p, i, perm_p[i]] = 1``.
    """
    perms = torch.tensor(permutation_table(k), dtype=torch.long, device=device)
    out = torch.zeros(len(perms), k, k, dtype=dtype, device=device)
    out.scatter_(2, perms.unsqueeze(-1), 1.0)
    return out


class PermutationSizeError(ValueError):
    """A map that needs all ``k!`` permutations of a size ``k`` above :data:`MAX_PERMUTATION_SIZE`; ``size`` is
    ``k``."""

    def __init__(self, message: str, size: int):
        super().__init__(message)
        self.size = size


def check_permutation_size(k: int, what: str) -> None:
    """Raise :class:`PermutationSizeError` (a ``ValueError``) when ``k!`` coefficients would be unreasonable."""
    if k > MAX_PERMUTATION_SIZE:
        raise PermutationSizeError(
            f"{what} needs all {k}! = {math.factorial(k)} permutations of size {k}, more than "
            f"the limit of size {MAX_PERMUTATION_SIZE}. Use 'kromhc' with a stream count whose "
            f"prime factors are all <= {MAX_PERMUTATION_SIZE} (e.g. 4, 6, 8, 12, 16), or 'mhc'.", k)


def prime_factors(n: int) -> tuple:
    """Prime factorisation of ``n >= 2``, ascending: ``12 -> (2, 2, 3)``."""
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return tuple(out)


def kronecker_factors(n: int) -> tuple:
    """Factor sizes ``(i_1, ..., i_K)`` with ``prod i_k = n`` minimising ``sum i_k!``.

    Splitting a factor ``ab`` (a, b >= 2) into ``a`` and ``b`` never adds logits
    (``a! + b! <= (ab)!``), so the prime factorisation is the minimiser.
    """
    if n < 2:
        raise ValueError(f"KromHC needs num_streams >= 2, got {n}")
    return prime_factors(n)


@lru_cache(maxsize=None)
def mixture_tables(factors: tuple):
    """``columns (R, n)``: ``sigma_r(i)`` of each combined permutation; ``logit_index (R, K)``: the logit of each
    factor's permutation in ``r``; ``starts (K + 1,)``: where each factor's chunk of logits begins (and ends).

    The Kronecker product of one Birkhoff mix per factor (sizes ``factors``, ``R = prod_k i_k!``) is the mixture
    over these ``R`` combined permutations with weights ``W_r = prod_k w^(k)_{r_k}``: the tables of the kernels
    that form it (numba's and Triton's ``permutation_mix``). Rows and columns of a Kronecker product are
    numbered with the first factor most significant (``(a, b) -> a i_2 + b``), the convention of
    :func:`kromhc_vision.residual_maps.kronecker`; the permutations of size k are numbered as
    :func:`permutation_matrices` numbers them.
    """
    tables = [permutation_table(k) for k in factors]
    starts = np.cumsum([0] + [len(t) for t in tables]).astype(np.int64)
    n = math.prod(factors)
    columns, logit_index = [], []
    for combo in itertools.product(*[range(len(t)) for t in tables]):
        cols = []
        for digits in itertools.product(*[range(k) for k in factors]):
            col = 0
            for k, table, p, a in zip(factors, tables, combo, digits):
                col = col * k + table[p][a]
            cols.append(col)
        columns.append(cols)
        logit_index.append([starts[k] + p for k, p in enumerate(combo)])
    assert all(len(c) == n for c in columns)
    return np.array(columns, dtype=np.int64), np.array(logit_index, dtype=np.int64), starts
