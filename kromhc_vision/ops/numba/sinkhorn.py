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
Reference: :func:`kromhc_vision.ops.reference.sinkhorn`.
"""
import math

import numba
import numpy as np
import torch

from ..reference import compute_dtype
from .._custom_ops import apply, call, custom_op, register_autograd
from ._common import as_dtype, kernel_array, match_torch_threads
from ._exp import exp_nonpositive

SPAN_LIMIT = {torch.float64: 200.0, torch.float32: 32.0}  # see the module docstring
_CHUNK = 128  # tokens per parallel task; the loops over a task's tokens are the vectorised ones


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
def _task_forward(logits, t0, m, num_iters, span_limit, P, sums, acc):
    """``P (n*n, >= m)`` <- the last iterate of tokens ``t0 .. t0+m`` (log values on the log-domain
    path). Returns whether the task ran in the log domain (some token's logits span more than
    ``span_limit`` (``SPAN_LIMIT[dtype]``), or reach +-inf; NaN logits give NaN on either path, as in the reference).
    """
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
    for k in range(2 * num_iters):
        _half_step(P, m, n, k, sums, log_domain, acc)
    return log_domain


@numba.njit(cache=True, error_model="numpy")
def _scratch(n, num_iters, dtype):
    """A worker's arrays for one task: iterate ``P``, gradient ``G`` ``(n*n, chunk)``, half-step sums, two rows."""
    return (np.empty((n * n, _CHUNK), dtype), np.empty((n * n, _CHUNK), dtype),
            np.empty((2 * num_iters * n, _CHUNK), dtype), np.empty(_CHUNK, dtype), np.empty(_CHUNK, dtype))


@numba.njit(cache=True, error_model="numpy")
def _tasks(T, threads):
    """``(tasks, workers)``: worker ``w`` takes tasks ``w, w + workers, ...``, with one scratch for all."""
    tasks = (T + _CHUNK - 1) // _CHUNK
    return tasks, max(1, min(threads, tasks))


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _forward_kernel(logits, num_iters, span_limit, threads, out):
    T, n, _ = logits.shape
    tasks, workers = _tasks(T, threads)
    for w in numba.prange(workers):
        P, _, sums, acc, _ = _scratch(n, num_iters, logits.dtype)
        for task in range(w, tasks, workers):
            t0 = task * _CHUNK
            m = min(T - t0, _CHUNK)
            log_domain = _task_forward(logits, t0, m, num_iters, span_limit, P, sums, acc)
            for t in range(m):
                for i in range(n):
                    for j in range(n):
                        v = P[i * n + j, t]
                        out[t0 + t, i, j] = math.exp(v) if log_domain else v


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _backward_kernel(logits, num_iters, span_limit, threads, dout, dlogits):
    """Per task: the forward again, then its half-steps walked back from the last iterate and the sums.

    Linear domain, half-step ``Q = P / s`` along an axis: ``dP = (dQ - sum(dQ * Q)) / s``, then ``P = Q * s``;
    the walk ends at ``P_0 = exp(L - max L)``, whose gradient is ``dL = P_0 * dP_0``. Log domain,
    ``L' = L - lse(L)``: ``dL = dL' - exp(L') sum(dL')``, then ``L = L' + lse``.
    """
    T, n, _ = dout.shape
    one = logits.dtype.type(1)
    tasks, workers = _tasks(T, threads)
    for w in numba.prange(workers):
        P, G, sums, acc, inv = _scratch(n, num_iters, logits.dtype)
        for task in range(w, tasks, workers):
            t0 = task * _CHUNK
            m = min(T - t0, _CHUNK)
            log_domain = _task_forward(logits, t0, m, num_iters, span_limit, P, sums, acc)
            for t in range(m):
                for i in range(n):
                    for j in range(n):
                        e = i * n + j
                        G[e, t] = dout[t0 + t, i, j] * (math.exp(P[e, t]) if log_domain else 1.0)
            for k in range(2 * num_iters - 1, -1, -1):
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
            for t in range(m):
                for i in range(n):
                    for j in range(n):
                        e = i * n + j
                        dlogits[t0 + t, i, j] = G[e, t] if log_domain else G[e, t] * P[e, t]


def _tokens(t, dtype):
    n = t.shape[-1]
    return kernel_array(t, dtype, -1, n, n)


@custom_op("kromhc_vision::cpu_sinkhorn_fwd", device_types="cpu")
def _sinkhorn_fwd(logits: torch.Tensor, num_iters: int) -> torch.Tensor:
    dtype = compute_dtype(logits)
    flat = _tokens(logits, dtype)
    out = torch.empty(logits.shape, dtype=dtype)
    _forward_kernel(flat, num_iters, SPAN_LIMIT[dtype], match_torch_threads(), out.numpy().reshape(flat.shape))
    return as_dtype(out, logits.dtype)


@_sinkhorn_fwd.register_fake
def _(logits, num_iters):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@custom_op("kromhc_vision::cpu_sinkhorn_bwd", device_types="cpu")
def _sinkhorn_bwd(logits: torch.Tensor, num_iters: int, dout: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(logits)
    grad = torch.empty(dout.shape, dtype=dtype)
    flat = _tokens(logits, dtype)
    _backward_kernel(flat, num_iters, SPAN_LIMIT[dtype], match_torch_threads(), _tokens(dout, dtype),
                     grad.numpy().reshape(flat.shape))
    return as_dtype(grad, dout.dtype)


@_sinkhorn_bwd.register_fake
def _(logits, num_iters, dout):
    return torch.empty_like(dout, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.num_iters = inputs[1]


def _backward(ctx, dout):
    return call(_sinkhorn_bwd, *ctx.saved_tensors, ctx.num_iters, dout), None


register_autograd(_sinkhorn_fwd, _backward, _setup_context)


def sinkhorn(logits: torch.Tensor, num_iters: int) -> torch.Tensor:
    """``(..., n, n)`` logits -> ``(..., n, n)``; same values as :func:`kromhc_vision.ops.reference.sinkhorn`."""
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn expects logits of shape (..., n, n), got {tuple(logits.shape)}")
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    return apply(_sinkhorn_fwd, logits, num_iters)
