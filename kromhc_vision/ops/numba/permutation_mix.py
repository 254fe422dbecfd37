"""mHC-lite's and KromHC's ``H_res`` on CPU: a mixture of permutation matrices, one pass per direction.

With factor sizes ``(i_1, ..., i_K)`` (mHC-lite: ``(n,)``) and per-token logits holding one chunk of ``i_k!``
logits per factor, the Kronecker product of the factors' Birkhoff mixes is itself a mixture over the
``R = prod_k i_k!`` combined permutations ``sigma_r = P_{r_1} (x) ... (x) P_{r_K}``::

    w^(k) = softmax(logits chunk k),   W_r = prod_k w^(k)_{r_k},   H[i, sigma_r(i)] += W_r
    backward:  dW_r = sum_i dH[i, sigma_r(i)],   dw^(k)_p = sum_{r: r_k = p} dW_r prod_{k' != k} w^(k')_{r_k'},
               dlogits^(k) = w^(k) (dw^(k) - <w^(k), dw^(k)>)

Weights, products and sums are float64 per token, each entry of ``H`` rounded once to the logits' dtype, so
every row and column sums to 1 up to the rounding of its n entries. Tokens go in blocks of ``TOKEN_BLOCK``, moved
to the last axis of a float64 scratch, so that every loop runs over the block's tokens in vector registers, the
softmax's ``exp`` included (:func:`~kromhc_vision.ops.numba._exp.exp_nonpositive`: ``math.exp`` is a scalar
call). Each thread's blocks are a C function per dtype (:func:`_forward_body`, :func:`_backward_body`; the
tables by address) that :func:`~._launch.launch` calls on every thread (BENCHMARKS.md ``compile_time``).
PyTorch runs the same map as a dozen small ops with tokens moved to the last axis and back
(:func:`kromhc_vision.residual_maps.kronecker_birkhoff`, the reference; the Kronecker product there is formed in
the logits' dtype, so float32 values agree to rounding).
"""
import math
from functools import lru_cache

import numba
import numpy as np
import torch

from .._custom_ops import custom_op, register_logits_op
from ...permutations import mixture_tables
from ..reference import compute_dtype
from ._common import (KERNEL_TYPES, as_dtype, kernel_tensor, match_torch_threads, sized_kernel_tensor,
                      token_array)
from ._exp import exp_nonpositive
from ._launch import BODY_SIGNATURE, launch

_FLAGS = dict(cache=True, error_model="numpy")


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


TOKEN_BLOCK = 32  # tokens per block: the innermost, vectorised axis of every loop below (four 512-bit vectors)


@numba.njit(inline="always")
def _load_block(src, t0, nt, block):
    """``block (width, B)`` = rows ``t0 .. t0 + nt`` of ``src (T, width)`` transposed, in float64: token ``q`` in
    column ``q``, columns past ``nt`` zero."""
    for j in range(block.shape[0]):
        row = block[j]
        for q in range(nt):
            row[q] = np.float64(src[t0 + q, j])
        for q in range(nt, TOKEN_BLOCK):
            row[q] = 0.0


@numba.njit(inline="always")
def _softmax_block(logits, t0, nt, starts, w, top, total):
    """``w (m, B)`` = the per-chunk softmax of the logits of tokens ``t0 .. t0 + nt``, token ``q`` in column
    ``q`` (columns past ``nt``: the softmax of zeros), in float64; ``top``, ``total``: ``(B,)`` scratch."""
    _load_block(logits, t0, nt, w)
    for k in range(starts.shape[0] - 1):
        first = w[starts[k]]
        for q in range(TOKEN_BLOCK):
            top[q] = max(-np.inf, first[q])
            total[q] = 0.0
        for j in range(starts[k] + 1, starts[k + 1]):
            row = w[j]
            for q in range(TOKEN_BLOCK):
                top[q] = max(top[q], row[q])
        for j in range(starts[k], starts[k + 1]):
            row = w[j]
            for q in range(TOKEN_BLOCK):
                e = exp_nonpositive(row[q] - top[q])
                row[q] = e
                total[q] += e
        for q in range(TOKEN_BLOCK):  # one division per token (the loops over q compile to scalar divisions)
            total[q] = 1.0 / total[q]
        for j in range(starts[k], starts[k + 1]):
            row = w[j]
            for q in range(TOKEN_BLOCK):
                row[q] *= total[q]


# The bodies' int64 arguments (:mod:`._launch`), by position; the tables (int64, C-contiguous) by their addresses
# (:func:`_tables` makes the first ones)
FORWARD_ARGS = ("m", "R", "K", "members_per_entry", "n", "members", "logit_index", "starts", "T", "threads", "logits",
                "out")
BACKWARD_ARGS = ("m", "R", "K", "n", "columns", "logit_index", "starts", "T", "threads", "logits", "dout", "dlogits")


@lru_cache(maxsize=None)
def _forward_body(dtype):
    """The forward's body for float dtype ``dtype``, run by each of ``threads`` threads: a ``cfunc``
    (:mod:`._launch`), its arguments :data:`FORWARD_ARGS`: ``logits (T, m)`` -> ``out (T, n*n)``; tokens in blocks
    of ``TOKEN_BLOCK``, thread ``p`` taking blocks ``p, p + threads, ...`` (balanced for any count) with its own
    scratch. ``DT`` must stay the closure's only free variable (see
    :func:`kromhc_vision.ops.numba.stream_pre._forward_body`)."""
    DT = dtype

    @numba.cfunc(BODY_SIGNATURE, **_FLAGS)
    def forward(p, a):
        like = DT(0)
        m, R, K, M, n, T, threads = a[0], a[1], a[2], a[3], a[4], a[8], a[9]
        index = np.int64(0)
        members, logit_index = token_array(a[5], index, (n * n, M)), token_array(a[6], index, (R, K))
        starts = token_array(a[7], index, (K + 1,))
        logits, out = token_array(a[10], like, (T, m)), token_array(a[11], like, (T, n * n))
        blocks = (T + TOKEN_BLOCK - 1) // TOKEN_BLOCK
        w = np.empty((m, TOKEN_BLOCK))  # the softmax weights
        weights = np.empty((R if K > 1 else 0, TOKEN_BLOCK))  # the combined permutations' (w itself for K = 1)
        top, total, acc = np.empty(TOKEN_BLOCK), np.empty(TOKEN_BLOCK), np.empty(TOKEN_BLOCK)
        for b in range(p, blocks, threads):
            t0 = b * TOKEN_BLOCK
            nt = min(TOKEN_BLOCK, T - t0)
            _softmax_block(logits, t0, nt, starts, w, top, total)
            W = w
            if K > 1:
                for r in range(R):
                    row, first = weights[r], w[logit_index[r, 0]]
                    for q in range(TOKEN_BLOCK):
                        row[q] = first[q]
                    for k in range(1, K):
                        f = w[logit_index[r, k]]
                        for q in range(TOKEN_BLOCK):
                            row[q] *= f[q]
                W = weights
            for e in range(n * n):
                for q in range(TOKEN_BLOCK):
                    acc[q] = 0.0
                for i in range(M):
                    row = W[members[e, i]]
                    for q in range(TOKEN_BLOCK):
                        acc[q] += row[q]
                for q in range(nt):
                    out[t0 + q, e] = acc[q]
        return 1

    return forward


@lru_cache(maxsize=None)
def _backward_body(dtype):
    """The backward's body (as :func:`_forward_body`; arguments :data:`BACKWARD_ARGS`): ``dout (T, n*n)`` ->
    ``dlogits (T, m)``, blocked as the forward. The softmax weights are formed again from the logits, as the forward
    formed them (the same values): what the backward keeps is the logits, which the connection keeps anyway,
    instead of ``m`` float64 weights per token, so that recomputation can keep ``H_res`` (BENCHMARKS.md
    ``bench_models_xeon_blocked``)."""
    DT = dtype

    @numba.cfunc(BODY_SIGNATURE, **_FLAGS)
    def backward(p, a):
        like = DT(0)
        m, R, K, n, T, threads = a[0], a[1], a[2], a[3], a[7], a[8]
        index = np.int64(0)
        columns, logit_index = token_array(a[4], index, (R, n)), token_array(a[5], index, (R, K))
        starts = token_array(a[6], index, (K + 1,))
        logits, dout = token_array(a[9], like, (T, m)), token_array(a[10], like, (T, n * n))
        dlogits = token_array(a[11], like, (T, m))
        blocks = (T + TOKEN_BLOCK - 1) // TOKEN_BLOCK
        w, dw = np.empty((m, TOKEN_BLOCK)), np.empty((m, TOKEN_BLOCK))
        d = np.empty((n * n, TOKEN_BLOCK))  # dout of the block, token q in column q
        top, total, dW, prod = (np.empty(TOKEN_BLOCK), np.empty(TOKEN_BLOCK), np.empty(TOKEN_BLOCK),
                                np.empty(TOKEN_BLOCK))
        for b in range(p, blocks, threads):
            t0 = b * TOKEN_BLOCK
            nt = min(TOKEN_BLOCK, T - t0)
            _softmax_block(logits, t0, nt, starts, w, top, total)
            _load_block(dout, t0, nt, d)
            dw[:, :] = 0.0
            for r in range(R):
                for q in range(TOKEN_BLOCK):
                    dW[q] = 0.0
                for i in range(n):
                    row = d[i * n + columns[r, i]]
                    for q in range(TOKEN_BLOCK):
                        dW[q] += row[q]
                for k in range(K):
                    for q in range(TOKEN_BLOCK):
                        prod[q] = dW[q]
                    for k2 in range(K):
                        if k2 != k:
                            f = w[logit_index[r, k2]]
                            for q in range(TOKEN_BLOCK):
                                prod[q] *= f[q]
                    row = dw[logit_index[r, k]]
                    for q in range(TOKEN_BLOCK):
                        row[q] += prod[q]
            for k in range(K):
                for q in range(TOKEN_BLOCK):
                    total[q] = 0.0
                for j in range(starts[k], starts[k + 1]):
                    wj, dj = w[j], dw[j]
                    for q in range(TOKEN_BLOCK):
                        total[q] += wj[q] * dj[q]
                for j in range(starts[k], starts[k + 1]):
                    wj, dj = w[j], dw[j]
                    for q in range(nt):
                        dlogits[t0 + q, j] = wj[q] * (dj[q] - total[q])
        return 1

    return backward


@lru_cache(maxsize=None)
def _tables(factors: tuple):
    """``n`` and the bodies' leading arguments for ``factors``: the forward's (``m, R, K, members_per_entry, n`` and
    the addresses of the tables ``members``, ``logit_index``, ``starts``) and the backward's (``m, R, K, n`` and
    ``columns``, ``logit_index``, ``starts``), made once: the tables are cached arrays (:func:`mixture_tables`,
    :func:`_members`), alive as long as the process."""
    columns, logit_index, starts = mixture_tables(factors)
    members = _members(factors)
    (R, n), K, m = columns.shape, logit_index.shape[1], int(starts[-1])
    return n, ((m, R, K, members.shape[1], n, members.ctypes.data, logit_index.ctypes.data, starts.ctypes.data),
               (m, R, K, n, columns.ctypes.data, logit_index.ctypes.data, starts.ctypes.data))


def _run(make_body, dtype, tables, T, addresses):
    """``make_body``'s body for ``dtype`` on the threads PyTorch uses: its arguments the ``tables``
    (:func:`_tables`), ``T``, the thread count and the tensors' ``addresses``."""
    threads = match_torch_threads()
    launch(make_body(KERNEL_TYPES[dtype]).address, threads, (*tables, T, threads, *addresses))


def _logits(logits, factors, dtype):
    """``logits (..., m)`` in ``dtype``, C-contiguous, its token count, ``n`` and the bodies' leading arguments
    (:func:`_tables`)."""
    n, args = _tables(tuple(factors))
    m = args[0][0]
    if logits.dim() < 1 or logits.shape[-1] != m:
        raise ValueError(f"permutation_mix with factors {list(factors)} expects logits of shape (..., {m}), got "
                         f"{tuple(logits.shape)}")
    return kernel_tensor(logits, dtype), logits.numel() // m, n, args


@custom_op("kromhc_vision::cpu_permutation_mix_fwd", device_types="cpu")
def _permutation_mix_fwd(logits: torch.Tensor, factors: list[int]) -> torch.Tensor:
    """``logits (..., m)`` -> ``H_res (..., n, n)``."""
    dtype = compute_dtype(logits)
    flat, T, n, (tables, _) = _logits(logits, factors, dtype)
    out = torch.empty((*logits.shape[:-1], n, n), dtype=dtype)
    _run(_forward_body, dtype, tables, T, (flat.data_ptr(), out.data_ptr()))
    return as_dtype(out, logits.dtype)


@_permutation_mix_fwd.register_fake
def _(logits, factors):
    n = math.prod(factors)
    return logits.new_empty(*logits.shape[:-1], n, n)


@custom_op("kromhc_vision::cpu_permutation_mix_bwd", device_types="cpu")
def _permutation_mix_bwd(logits: torch.Tensor, factors: list[int], dout: torch.Tensor) -> torch.Tensor:
    """``logits``: the forward's input; ``dout``: the gradient of ``H_res`` -> the gradient of ``logits``."""
    dtype = compute_dtype(logits)
    flat, T, n, (_, tables) = _logits(logits, factors, dtype)
    d = sized_kernel_tensor("permutation_mix backward", "dout", dout, T * n * n, dtype)
    grad = torch.empty(logits.shape, dtype=dtype)
    _run(_backward_body, dtype, tables, T, (flat.data_ptr(), d.data_ptr(), grad.data_ptr()))
    return as_dtype(grad, logits.dtype)


@_permutation_mix_bwd.register_fake
def _(logits, factors, dout):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


_permutation_mix = register_logits_op(_permutation_mix_fwd, _permutation_mix_bwd)


def permutation_mix(logits: torch.Tensor, perms: list) -> torch.Tensor:
    """``(..., sum_k i_k!)`` logits -> ``(..., n, n)``: the Kronecker product of one Birkhoff mix per factor
    (one factor: mHC-lite). ``perms[k]`` is ``permutation_matrices(i_k)`` (only its size is read: the kernel
    numbers the permutations the same way). Same values as :func:`kromhc_vision.residual_maps.kronecker_birkhoff`.
    """
    factors = [int(p.shape[-1]) for p in perms]
    return _permutation_mix(logits, factors)
