"""mHC's Sinkhorn-Knopp on CPU, ``(..., n, n) -> (..., n, n)``, in float32 (float64 for float64 logits).

The iterates are those of :func:`kromhc_vision.ops.reference.sinkhorn`: rows, then columns,
normalised in turn, ``2 * num_iters`` half-steps in all. Tokens are taken 128 at a time with the
token on the innermost (vectorised) axis. The half-steps run in the linear domain, ``P <- P / sum(P)``
from ``P = exp(L - max L)`` (no exponentials after the first), which is safe when every token's
logits span at most ``SPAN_LIMIT[dtype]``: each iterate ``D_1 exp(L) D_2`` then keeps every entry
above ``exp(-2 span) / n^3`` (the ratios of its scalings are bounded by the span), a normal number
for spans up to ~40 in float32 and ~350 in float64. A group of tokens holding a wider span (or
infinite logits) runs the same half-steps in the log domain, ``L <- L - logsumexp(L)``. In float32
the result is as close to the float64 answer as the float32 reference's (tests/ops/test_numba_sinkhorn.py).
The backward keeps only the logits: per task it runs the forward again, keeping each half-step's n sums
(log-sum-exps) in a scratch of its worker thread (``2 * num_iters * n`` values per token of the task,
small enough to stay in L2), then walks the half-steps back, rebuilding each earlier iterate from the
later one and its sums. Keeping the sums from the forward instead would add ``2 * num_iters * n`` values
per token to the activations every connection keeps for its backward.
Up to ``UNROLLED_MAX_STREAMS`` streams the linear domain runs a whole iteration per pass over a task's tokens,
each token's ``n^2`` entries in registers (:func:`_unrolled`; the same values, bitwise, as the pass per row or
column that larger ``n`` and the log domain run): BENCHMARKS.md ``sinkhorn_unrolled``.
Each thread's tasks are a C function (:func:`_forward_body`, :func:`_backward_body`) that
:func:`~._launch.launch` calls on every thread (BENCHMARKS.md ``compile_time``).
Reference: :func:`kromhc_vision.ops.reference.sinkhorn`.
"""
import functools
import math

import numba
import numpy as np
import torch
from numba.core import errors, types
from numba.extending import overload

from ..reference import check_square_logits, compute_dtype
from .._custom_ops import custom_op, register_logits_op
from ._common import (KERNEL_TYPES, as_dtype, kernel_tensor, match_torch_threads, sized_kernel_tensor,
                      token_array)
from ._launch import BODY_SIGNATURE, bits_of_float, float_from_bits, launch
from ._exp import exp_nonpositive
from ._stack import stack_pointer

SPAN_LIMIT = {torch.float64: 200.0, torch.float32: 32.0}  # see the module docstring
_CHUNK = 128  # tokens per parallel task; the loops over a task's tokens are the vectorised ones
# Up to this many streams the linear domain runs _unrolled's kernels; above, LLVM does not unroll their loops over a
# token's entries (n = 6, 7: the walk back; checked in the assembly) and the by-row ones are 4-6x faster (n = 8, 16)
UNROLLED_MAX_STREAMS = 5


@numba.njit(cache=True, error_model="numpy", inline="always")
def _entry(k, a, b, n):
    """Row of entry (a, b) of a row (k even) or entry (b, a) of a column (k odd) in an ``(n*n, m)`` block."""
    return a * n + b if k % 2 == 0 else b * n + a


@numba.njit(cache=True, error_model="numpy")
def _half_step(P, m, n, k, sums, log_domain, acc):
    """Half-step ``k`` on a task's ``m`` tokens, ``P (n*n, >= m)`` (entry ``i*n + j`` of each token on a row):
    rows (k even) or columns (k odd) to sum 1. Their sums (log-sum-exps in the log domain) go to
    ``sums[k*n : (k+1)*n]``.
    """
    one = P.dtype.type(1)
    for a in range(n):
        out = k * n + a
        if log_domain:
            for t in range(m):
                hi = -math.inf
                for b in range(n):
                    hi = max(hi, P[_entry(k, a, b, n), t])
                s = 0.0
                for b in range(n):
                    s += math.exp(P[_entry(k, a, b, n), t] - hi)
                sums[out, t] = hi + math.log(s)
            for b in range(n):
                e = _entry(k, a, b, n)
                for t in range(m):
                    P[e, t] -= sums[out, t]
        else:
            e = _entry(k, a, 0, n)
            for t in range(m):
                sums[out, t] = P[e, t]
            for b in range(1, n):
                e = _entry(k, a, b, n)
                for t in range(m):
                    sums[out, t] += P[e, t]
            for t in range(m):
                acc[t] = one / sums[out, t]
            for b in range(n):
                e = _entry(k, a, b, n)
                for t in range(m):
                    P[e, t] *= acc[t]


@numba.njit(cache=True, error_model="numpy")
def _half_step_back(P, G, m, n, k, sums, log_domain, acc, inv):
    """Half-step ``k`` walked back: from its iterate ``P`` and gradient ``G`` (``(n*n, >= m)`` each) to the
    previous ones, with its sums. Linear domain, ``Q = P / s`` along an axis: ``dP = (dQ - sum(dQ * Q)) / s``,
    then ``P = Q * s``. Log domain, ``L' = L - lse(L)``: ``dL = dL' - exp(L') sum(dL')``, then ``L = L' + lse``."""
    one = P.dtype.type(1)
    for a in range(n):
        s = k * n + a
        for t in range(m):
            acc[t] = 0.0
            inv[t] = one / sums[s, t]
        for b in range(n):
            e = _entry(k, a, b, n)
            if log_domain:
                for t in range(m):
                    acc[t] += G[e, t]
            else:
                for t in range(m):
                    acc[t] += G[e, t] * P[e, t]
        for b in range(n):
            e = _entry(k, a, b, n)
            if log_domain:
                for t in range(m):
                    G[e, t] -= math.exp(P[e, t]) * acc[t]
                    P[e, t] += sums[s, t]
            else:
                for t in range(m):
                    G[e, t] = (G[e, t] - acc[t]) * inv[t]
                    P[e, t] *= sums[s, t]


@numba.njit(cache=True, error_model="numpy")
def _rows(flat, rows):
    """A flat scratch array as ``(rows, _CHUNK)`` (a view)."""
    return flat[:rows * _CHUNK].reshape((rows, _CHUNK))


@numba.njit(cache=True, error_model="numpy")
def _iterations_by_row(P, m, n, num_iters, sums, acc):
    """The linear domain's ``2 * num_iters`` half-steps with :func:`_half_step`, one pass over the tokens per row
    or column and step of it (``P`` and ``sums`` flat, as :func:`_scratch` makes them)."""
    P2, sums2 = _rows(P, n * n), _rows(sums, 2 * num_iters * n)
    for k in range(2 * num_iters):
        _half_step(P2, m, n, k, sums2, False, acc)


@numba.njit(cache=True, error_model="numpy")
def _walk_back_by_row(P, G, m, n, num_iters, sums, acc, inv):
    """The linear domain's half-steps walked back with :func:`_half_step_back`."""
    P2, G2, sums2 = _rows(P, n * n), _rows(G, n * n), _rows(sums, 2 * num_iters * n)
    for k in range(2 * num_iters - 1, -1, -1):
        _half_step_back(P2, G2, m, n, k, sums2, False, acc, inv)


@numba.njit(cache=True, error_model="numpy")
def _task_start(logits, t0, m, span_limit, P, acc):
    """``P (n*n, >= m)`` <- tokens ``t0 .. t0+m`` of ``logits``: ``exp(L - max L)`` for the linear domain, or the
    logits themselves where some token's logits span more than ``span_limit`` (``SPAN_LIMIT[dtype]``) or reach
    +-inf, which then run in the log domain (NaN logits give NaN on either path, as in the reference).
    Returns whether the task runs in the log domain."""
    n = logits.shape[1]
    log_domain = False
    for t in range(m):
        lo, hi = math.inf, -math.inf
        for i in range(n):
            for j in range(n):
                v = logits[t0 + t, i, j]
                P[i * n + j, t] = v
                lo = min(lo, v)
                hi = max(hi, v)
        acc[t] = hi
        log_domain = log_domain or hi - lo > span_limit
    if not log_domain:
        for e in range(n * n):
            for t in range(m):
                P[e, t] = exp_nonpositive(P[e, t] - acc[t])  # vectorised over t, where math.exp is a scalar call
    return log_domain


@numba.njit(cache=True, error_model="numpy")
def _scratch(n, num_iters, dtype):
    """A worker's arrays for one task, flat with ``_CHUNK`` values per row: iterate ``P`` and gradient ``G``
    ``(n*n, _CHUNK)``, the half-steps' sums ``(2 * num_iters * n, _CHUNK)``, and two rows."""
    return (np.empty(n * n * _CHUNK, dtype), np.empty(n * n * _CHUNK, dtype),
            np.empty(2 * num_iters * n * _CHUNK, dtype), np.empty(_CHUNK, dtype), np.empty(_CHUNK, dtype))


def unrolled_iterations(P, m, n, num_iters, sums, acc):
    """The linear domain's iterations for ``n`` streams, a compile-time constant (see :func:`_unrolled`)."""
    raise NotImplementedError("called from numba kernels only")


def unrolled_walk_back(P, G, m, n, num_iters, sums, acc, inv):
    """Their walk back (see :func:`_unrolled`)."""
    raise NotImplementedError("called from numba kernels only")


def _unrolled(N: int):
    """The linear domain's iterations and their walk back for ``N`` streams (a compile-time constant), a whole
    iteration (rows, then columns) in one pass over a task's tokens: the vectorised loop loads each token's ``N^2``
    entries (and gradients) into registers (arrays on the stack whose indices are constant once the loops over
    them unroll), computes, and stores them once, where :func:`_half_step` passes over every entry once per row
    or column. All loads come before all stores: LLVM's loop vectoriser takes this order, not interleaved ones
    (it gave up on those, checked in the assembly). Signatures as :func:`_iterations_by_row` and
    :func:`_walk_back_by_row`; the values are theirs, bitwise (the same operations in the same order).

    They are the implementations of :func:`unrolled_iterations` and :func:`unrolled_walk_back` for a literal ``n``
    (numba ``overload`` s): the bodies call them by name, so that their closures hold only ``N`` (see
    :func:`_forward_body`)."""
    NN, N2 = N * N, 2 * N  # the stack arrays' sizes: constants, as stack_pointer needs

    def iterations(P, m, n, num_iters, sums, acc):
        one = P.dtype.type(1)
        p = numba.carray(stack_pointer(NN, P.dtype), NN)  # a token's iterate
        q = numba.carray(stack_pointer(N2, P.dtype), N2)  # its row sums, then column sums
        for it in range(num_iters):
            kept = sums[2 * it * N * _CHUNK:(2 * it + 2) * N * _CHUNK]
            for t in range(m):
                for e in range(NN):
                    p[e] = P[e * _CHUNK + t]
                for a in range(N):
                    s = p[a * N]
                    for b in range(1, N):
                        s += p[a * N + b]
                    q[a] = s
                    r = one / s
                    for b in range(N):
                        p[a * N + b] *= r
                for a in range(N):
                    s = p[a]
                    for b in range(1, N):
                        s += p[b * N + a]
                    q[N + a] = s
                    r = one / s
                    for b in range(N):
                        p[b * N + a] *= r
                for e in range(NN):
                    P[e * _CHUNK + t] = p[e]
                for a in range(N2):
                    kept[a * _CHUNK + t] = q[a]

    def walk_back(P, G, m, n, num_iters, sums, acc, inv):
        one = P.dtype.type(1)
        zero = P.dtype.type(0)
        p = numba.carray(stack_pointer(NN, P.dtype), NN)
        g = numba.carray(stack_pointer(NN, P.dtype), NN)
        q = numba.carray(stack_pointer(N2, P.dtype), N2)
        for it in range(num_iters - 1, -1, -1):
            kept = sums[2 * it * N * _CHUNK:(2 * it + 2) * N * _CHUNK]
            for t in range(m):
                for e in range(NN):
                    p[e] = P[e * _CHUNK + t]
                    g[e] = G[e * _CHUNK + t]
                for a in range(N2):
                    q[a] = kept[a * _CHUNK + t]
                for a in range(N):  # the columns' half-step, then the rows'
                    s = q[N + a]
                    d = zero
                    for b in range(N):
                        d += g[b * N + a] * p[b * N + a]
                    r = one / s
                    for b in range(N):
                        g[b * N + a] = (g[b * N + a] - d) * r
                        p[b * N + a] *= s
                for a in range(N):
                    s = q[a]
                    d = zero
                    for b in range(N):
                        d += g[a * N + b] * p[a * N + b]
                    r = one / s
                    for b in range(N):
                        g[a * N + b] = (g[a * N + b] - d) * r
                        p[a * N + b] *= s
                for e in range(NN):
                    P[e * _CHUNK + t] = p[e]
                    G[e * _CHUNK + t] = g[e]

    return iterations, walk_back


def _literal_streams(n) -> int:
    if not isinstance(n, types.IntegerLiteral):
        raise errors.TypingError("the stream count must be a compile-time constant")
    return n.literal_value


@overload(unrolled_iterations)
def _unrolled_iterations(P, m, n, num_iters, sums, acc):
    return _unrolled(_literal_streams(n))[0]


@overload(unrolled_walk_back)
def _unrolled_walk_back(P, G, m, n, num_iters, sums, acc, inv):
    return _unrolled(_literal_streams(n))[1]


def task_forward(logits, t0, m, n, num_iters, span_limit, P, sums, acc):
    """``P`` (flat, as :func:`_scratch` makes it) <- the last iterate of tokens ``t0 .. t0+m`` (log values in the
    log domain), ``sums`` <- each half-step's sums; returns whether the task ran in the log domain
    (:func:`_task_start`). ``n``: the stream count, a compile-time constant."""
    raise NotImplementedError("called from numba kernels only")


@overload(task_forward)
def _task_forward(logits, t0, m, n, num_iters, span_limit, P, sums, acc):
    N = _literal_streams(n)
    unrolled = N <= UNROLLED_MAX_STREAMS

    def task_forward(logits, t0, m, n, num_iters, span_limit, P, sums, acc):
        P2 = _rows(P, N * N)
        log_domain = _task_start(logits, t0, m, span_limit, P2, acc)
        if log_domain:
            sums2 = _rows(sums, 2 * num_iters * N)
            for k in range(2 * num_iters):
                _half_step(P2, m, N, k, sums2, True, acc)
        elif unrolled:
            unrolled_iterations(P, m, N, num_iters, sums, acc)
        else:
            _iterations_by_row(P, m, N, num_iters, sums, acc)
        return log_domain

    return task_forward


# The bodies' int64 arguments (:mod:`._launch`), by position
FORWARD_ARGS = ("T", "num_iters", "span_limit", "workers", "logits", "out")
BACKWARD_ARGS = ("T", "num_iters", "span_limit", "workers", "logits", "dout", "dlogits")


@functools.lru_cache(maxsize=None)
def _forward_body(num_streams: int, dtype):
    """The forward's body for ``num_streams`` streams (``N``, a compile-time constant) and float dtype ``dtype``,
    run by each of ``workers`` threads (:func:`_run`; worker ``w`` takes tasks ``w, w + workers, ...`` of
    ``_CHUNK`` tokens, with one scratch for all): a ``cfunc`` (:mod:`._launch`), its arguments
    :data:`FORWARD_ARGS` (``span_limit`` by its bits), ``logits`` and ``out`` ``T`` tokens of ``N x N``. The linear
    domain's iterations by :func:`_unrolled` up to ``UNROLLED_MAX_STREAMS`` streams, by row above.

    ``N`` and ``DT`` (and the backward's ``unrolled``, a bool) must stay the closures' only free variables: numba's disk cache keys a closure by the pickled
    contents of its cells, and a dispatcher in a cell pickles differently in every process
    (``tests/ops/test_numba_cache.py``); the per-``N`` code the bodies share is reached by name, through the
    overloads above."""
    N, DT = num_streams, dtype

    @numba.cfunc(BODY_SIGNATURE, cache=True, error_model="numpy")
    def forward(w, a):
        like = DT(0)
        T, num_iters, span_limit, workers = a[0], a[1], float_from_bits(a[2]), a[3]
        logits, out = token_array(a[4], like, (T, N, N)), token_array(a[5], like, (T, N, N))
        tasks = (T + _CHUNK - 1) // _CHUNK
        P, _, sums, acc, _ = _scratch(N, num_iters, logits.dtype)
        P2 = _rows(P, N * N)
        for task in range(w, tasks, workers):
            t0 = task * _CHUNK
            m = min(T - t0, _CHUNK)
            log_domain = task_forward(logits, t0, m, N, num_iters, span_limit, P, sums, acc)
            for t in range(m):
                for i in range(N):
                    for j in range(N):
                        v = P2[i * N + j, t]
                        out[t0 + t, i, j] = math.exp(v) if log_domain else v
        return 1

    return forward


@functools.lru_cache(maxsize=None)
def _backward_body(num_streams: int, dtype):
    """The backward's body (as :func:`_forward_body`; arguments :data:`BACKWARD_ARGS`). Per task: the forward
    again, keeping each half-step's sums, then its half-steps walked back from the last iterate
    (:func:`_half_step_back`), to ``P_0 = exp(L - max L)``, whose gradient is ``dL = P_0 * dP_0`` (log domain: to
    the logits and their gradient)."""
    N, DT = num_streams, dtype
    unrolled = N <= UNROLLED_MAX_STREAMS

    @numba.cfunc(BODY_SIGNATURE, cache=True, error_model="numpy")
    def backward(w, a):
        like = DT(0)
        T, num_iters, span_limit, workers = a[0], a[1], float_from_bits(a[2]), a[3]
        logits, dout = token_array(a[4], like, (T, N, N)), token_array(a[5], like, (T, N, N))
        dlogits = token_array(a[6], like, (T, N, N))
        tasks = (T + _CHUNK - 1) // _CHUNK
        P, G, sums, acc, inv = _scratch(N, num_iters, logits.dtype)
        P2, G2, sums2 = _rows(P, N * N), _rows(G, N * N), _rows(sums, 2 * num_iters * N)
        for task in range(w, tasks, workers):
            t0 = task * _CHUNK
            m = min(T - t0, _CHUNK)
            log_domain = task_forward(logits, t0, m, N, num_iters, span_limit, P, sums, acc)
            for t in range(m):
                for i in range(N):
                    for j in range(N):
                        e = i * N + j
                        G2[e, t] = dout[t0 + t, i, j] * (math.exp(P2[e, t]) if log_domain else 1.0)
            if log_domain:
                for k in range(2 * num_iters - 1, -1, -1):
                    _half_step_back(P2, G2, m, N, k, sums2, True, acc, inv)
            elif unrolled:
                unrolled_walk_back(P, G, m, N, num_iters, sums, acc, inv)
            else:
                _walk_back_by_row(P, G, m, N, num_iters, sums, acc, inv)
            for t in range(m):
                for i in range(N):
                    for j in range(N):
                        e = i * N + j
                        dlogits[t0 + t, i, j] = G2[e, t] if log_domain else G2[e, t] * P2[e, t]
        return 1

    return backward


_SPAN_BITS = {dtype: bits_of_float(limit) for dtype, limit in SPAN_LIMIT.items()}


def _run(make_body, n, dtype, T, num_iters, addresses):
    """``make_body``'s body for ``n`` streams and ``dtype`` on the threads PyTorch uses (at most one per task of
    ``_CHUNK`` tokens), with the tensors' ``addresses``. ``num_iters`` is checked here, for the custom ops called
    directly (inside a body, ``_scratch`` of a negative size would fail with the launcher's general error)."""
    if num_iters < 1:
        raise ValueError(f"sinkhorn: num_iters must be >= 1, got {num_iters}")
    workers = max(1, min(match_torch_threads(), (T + _CHUNK - 1) // _CHUNK))
    launch(make_body(n, KERNEL_TYPES[dtype]).address, workers,
           (T, num_iters, _SPAN_BITS[dtype], workers, *addresses))


def _logits(logits, dtype):
    """``logits (..., n, n)`` in ``dtype``, C-contiguous, and its token count."""
    check_square_logits(logits)
    n = logits.shape[-1]
    return kernel_tensor(logits, dtype), logits.numel() // (n * n)


@custom_op("kromhc_vision::cpu_sinkhorn_fwd", device_types="cpu")
def _sinkhorn_fwd(logits: torch.Tensor, num_iters: int) -> torch.Tensor:
    dtype = compute_dtype(logits)
    flat, T = _logits(logits, dtype)
    out = torch.empty(logits.shape, dtype=dtype)
    _run(_forward_body, logits.shape[-1], dtype, T, num_iters, (flat.data_ptr(), out.data_ptr()))
    return as_dtype(out, logits.dtype)


@_sinkhorn_fwd.register_fake
def _(logits, num_iters):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@custom_op("kromhc_vision::cpu_sinkhorn_bwd", device_types="cpu")
def _sinkhorn_bwd(logits: torch.Tensor, num_iters: int, dout: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(logits)
    flat, T = _logits(logits, dtype)
    d = sized_kernel_tensor("sinkhorn backward", "dout", dout, logits.numel(), dtype)
    grad = torch.empty(dout.shape, dtype=dtype)
    _run(_backward_body, logits.shape[-1], dtype, T, num_iters, (flat.data_ptr(), d.data_ptr(), grad.data_ptr()))
    return as_dtype(grad, dout.dtype)


@_sinkhorn_bwd.register_fake
def _(logits, num_iters, dout):
    return torch.empty_like(dout, memory_format=torch.contiguous_format)


_sinkhorn = register_logits_op(_sinkhorn_fwd, _sinkhorn_bwd)


def sinkhorn(logits: torch.Tensor, num_iters: int) -> torch.Tensor:
    """``(..., n, n)`` logits -> ``(..., n, n)``; same values as :func:`kromhc_vision.ops.reference.sinkhorn`.
    The ops check the logits' shape and ``num_iters`` (:func:`_logits`, :func:`_run`), as they are also called
    alone."""
    return _sinkhorn(logits, num_iters)
