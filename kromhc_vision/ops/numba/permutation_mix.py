"""mHC-lite's and KromHC's ``H_res`` on CPU: a mixture of permutation matrices, one pass per direction.

With factor sizes ``(i_1, ..., i_K)`` (mHC-lite: ``(n,)``) and per-token logits holding one chunk of ``i_k!``
logits per factor, the Kronecker product of the factors' Birkhoff mixes is itself a mixture over the
``R = prod_k i_k!`` combined permutations ``sigma_r = P_{r_1} (x) ... (x) P_{r_K}``::

    w^(k) = softmax(logits chunk k),   W_r = prod_k w^(k)_{r_k},   H[i, sigma_r(i)] += W_r
    backward:  dW_r = sum_i dH[i, sigma_r(i)],   dw^(k)_p = sum_{r: r_k = p} dW_r prod_{k' != k} w^(k')_{r_k'},
               dlogits^(k) = w^(k) (dw^(k) - <w^(k), dw^(k)>)

Weights, products and sums are float64 per token, each entry of ``H`` rounded once to the logits' dtype, so
every row and column sums to 1 up to the rounding of its n entries. PyTorch runs the same map as a dozen small
ops with tokens moved to the last axis and back (:func:`kromhc_vision.residual_maps.kronecker_birkhoff`, the
reference; the Kronecker product there is formed in the logits' dtype, so float32 values agree to rounding).
"""
import itertools
import math
from functools import lru_cache

import numba
import numpy as np
import torch

from .._custom_ops import apply, call, custom_op, register_autograd
from ...permutations import permutation_table
from ..reference import compute_dtype
from ._common import as_dtype, kernel_array, match_torch_threads

_FLAGS = dict(parallel=True, cache=True, error_model="numpy")


@lru_cache(maxsize=None)
def mixture_tables(factors: tuple):
    """``columns (R, n)``: ``sigma_r(i)`` of each combined permutation; ``logit_index (R, K)``: the logit of each
    factor's permutation in ``r``; ``starts (K + 1,)``: where each factor's chunk of logits begins (and ends).

    Rows and columns of a Kronecker product are numbered with the first factor most significant (``(a, b) ->
    a i_2 + b``), the convention of :func:`kromhc_vision.residual_maps.kronecker`; the permutations of size k
    are numbered as :func:`kromhc_vision.permutations.permutation_matrices` numbers them.
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


@lru_cache(maxsize=None)
def _members(factors: tuple):
    """``(n*n, R/n)``: for entry ``(i, j)`` of ``H``, the combined permutations with ``sigma_r(i) = j`` (each
    entry has ``prod_k (i_k - 1)! = R / n`` of them), so that ``H[i, j]`` is a sum of that many weights."""
    columns = mixture_tables(factors)[0]
    R, n = columns.shape
    members = [[] for _ in range(n * n)]
    for r in range(R):
        for i in range(n):
            members[i * n + columns[r, i]].append(r)
    return np.array(members, dtype=np.int64)


@numba.njit(inline="always")
def _softmax(logits, t, starts, w):
    """``w[t]`` = the per-chunk softmax of ``logits[t]``, in float64."""
    for k in range(starts.shape[0] - 1):
        top = -np.inf
        for j in range(starts[k], starts[k + 1]):
            top = max(top, np.float64(logits[t, j]))
        s = 0.0
        for j in range(starts[k], starts[k + 1]):
            e = math.exp(np.float64(logits[t, j]) - top)
            w[t, j] = e
            s += e
        for j in range(starts[k], starts[k + 1]):
            w[t, j] /= s


@numba.njit(**_FLAGS)
def _forward_kernel(logits, members, logit_index, starts, w, weights, out):
    T, R, K = logits.shape[0], logit_index.shape[0], logit_index.shape[1]
    for t in numba.prange(T):
        _softmax(logits, t, starts, w)
        for r in range(R):
            W = w[t, logit_index[r, 0]]
            for k in range(1, K):
                W *= w[t, logit_index[r, k]]
            weights[t, r] = W
        for e in range(members.shape[0]):
            s = 0.0
            for q in range(members.shape[1]):
                s += weights[t, members[e, q]]
            out[t, e] = s


@numba.njit(**_FLAGS)
def _backward_kernel(logits, dout, columns, logit_index, starts, w, dw, dlogits):
    """``w``, ``dw``: float64 scratch ``(T, m)``; the softmax weights are formed again from the logits, as the
    forward formed them (the same values): what the backward keeps is the logits, which the connection keeps
    anyway, instead of ``m`` float64 weights per token, so that recomputation can keep ``H_res`` (BENCHMARKS.md
    ``bench_models_xeon_blocked``)."""
    T, n = logits.shape[0], columns.shape[1]
    R, K = logit_index.shape
    for t in numba.prange(T):
        _softmax(logits, t, starts, w)
        for j in range(w.shape[1]):
            dw[t, j] = 0.0
        for r in range(R):
            dW = 0.0
            for i in range(n):
                dW += np.float64(dout[t, i, columns[r, i]])
            for k in range(K):
                p = dW
                for q in range(K):
                    if q != k:
                        p *= w[t, logit_index[r, q]]
                dw[t, logit_index[r, k]] += p
        for k in range(starts.shape[0] - 1):
            s = 0.0
            for j in range(starts[k], starts[k + 1]):
                s += w[t, j] * dw[t, j]
            for j in range(starts[k], starts[k + 1]):
                dlogits[t, j] = w[t, j] * (dw[t, j] - s)


@custom_op("kromhc_vision::cpu_permutation_mix_fwd", device_types="cpu")
def _permutation_mix_fwd(logits: torch.Tensor, factors: list[int]) -> torch.Tensor:
    """``logits (..., m)`` -> ``H_res (..., n, n)``."""
    columns, logit_index, starts = mixture_tables(tuple(factors))
    dtype = compute_dtype(logits)
    flat = kernel_array(logits, dtype, -1, logits.shape[-1])
    n = columns.shape[1]
    out = torch.empty((*logits.shape[:-1], n, n), dtype=dtype)
    w = np.empty(flat.shape)  # float64 scratch: the softmax weights
    weights = np.empty((flat.shape[0], logit_index.shape[0]))  # float64 scratch: the combined permutations'
    match_torch_threads()
    _forward_kernel(flat, _members(tuple(factors)), logit_index, starts, w, weights,
                    out.numpy().reshape(flat.shape[0], n * n))
    return as_dtype(out, logits.dtype)


@_permutation_mix_fwd.register_fake
def _(logits, factors):
    n = math.prod(factors)
    return logits.new_empty(*logits.shape[:-1], n, n)


@custom_op("kromhc_vision::cpu_permutation_mix_bwd", device_types="cpu")
def _permutation_mix_bwd(logits: torch.Tensor, factors: list[int], dout: torch.Tensor) -> torch.Tensor:
    """``logits``: the forward's input; ``dout``: the gradient of ``H_res`` -> the gradient of ``logits``."""
    columns, logit_index, starts = mixture_tables(tuple(factors))
    n = columns.shape[1]
    dtype = compute_dtype(logits)
    flat = kernel_array(logits, dtype, -1, logits.shape[-1])
    d = kernel_array(dout, dtype, -1, n, n)
    w, dw = np.empty(flat.shape), np.empty(flat.shape)  # float64 scratch
    grad = torch.empty(logits.shape, dtype=dtype)
    match_torch_threads()
    _backward_kernel(flat, d, columns, logit_index, starts, w, dw, grad.numpy().reshape(flat.shape))
    return as_dtype(grad, logits.dtype)


@_permutation_mix_bwd.register_fake
def _(logits, factors, dout):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.factors = inputs[1]


def _backward(ctx, dout):
    logits, = ctx.saved_tensors
    return call(_permutation_mix_bwd, logits, ctx.factors, dout), None


register_autograd(_permutation_mix_fwd, _backward, _setup_context)


def permutation_mix(logits: torch.Tensor, perms: list) -> torch.Tensor:
    """``(..., sum_k i_k!)`` logits -> ``(..., n, n)``: the Kronecker product of one Birkhoff mix per factor
    (one factor: mHC-lite). ``perms[k]`` is ``permutation_matrices(i_k)`` (only its size is read: the kernel
    numbers the permutations the same way). Same values as :func:`kromhc_vision.residual_maps.kronecker_birkhoff`.
    """
    factors = [int(p.shape[-1]) for p in perms]
    return apply(_permutation_mix_fwd, logits, factors)
