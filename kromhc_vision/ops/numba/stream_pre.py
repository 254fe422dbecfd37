"""The per-token part of ``stream_pre`` on CPU: everything around the projection GEMM, one pass each way.

Per token, with ``x`` the stream state ``(n, C)``, ``r = x W_g`` the projection (a BLAS GEMM, padded to
``k' >= k`` columns) and ``k = 2n + m``::

    forward:   rho = (|x|^2 / nC + eps)^-1/2,   a = b + s * r * rho,
               H_pre = sigmoid(a[:n]),  H_post = 2 sigmoid(a[n:2n]),  a_res = a[2n:],  u = H_pre x
    backward:  dH_pre += <du, x_j>,   da = [dH_pre H_pre (1 - H_pre) | dH_post H_post (1 - H_post / 2) | da_res]
               dr = s * da * rho (zero on the padding),   coef = -rho^3 / (nC) * sum_k s_k da_k r_k
               dx = dX_post + coef * x + H_pre^T du

``x`` is read once per direction and stays in L1 while the token's coefficients are formed; PyTorch
reads it three times forward (norm, ``u``) and backward (``<du, x>``, ``coef x``, ``H_pre^T du``)
and makes some ten small ops besides. The GEMM terms ``x W_g`` and ``dr W_g^T``, ``x^T dr`` stay with
BLAS. Reference: :func:`..pytorch.stream_pre.pre_tokens_forward` / :func:`..pytorch.stream_pre.pre_tokens_backward`.
"""
import functools
import math

import numba
import torch

from ..pytorch.stream_pre import stream_pre as _stream_pre_pytorch
from .._custom_ops import call, custom_op
from ._common import match_torch_threads, numpy_view

_FLAGS = dict(parallel=True, cache=True, error_model="numpy", fastmath={"reassoc", "contract"})


@functools.lru_cache(maxsize=None)
def _kernels(num_streams: int):
    """The forward and backward kernels for ``num_streams`` streams: ``N`` is a compile-time constant, so the
    loops over streams unroll and ``u`` is summed in registers (numba caches one pair per ``N``)."""
    N = num_streams

    @numba.njit(**_FLAGS)
    def forward(x, raw, scale, bias, eps, u, h_pre, h_post, a_res, inv_rms):
        T, _, C = x.shape
        k = bias.shape[0]
        dt = x.dtype.type  # every value in x's dtype, as the reference
        for t in numba.prange(T):
            s = dt(0)
            for j in range(N):
                for c in range(C):
                    s += x[t, j, c] * x[t, j, c]
            rho = dt(1.0 / math.sqrt(s / (N * C) + eps))
            inv_rms[t, 0] = rho
            for i in range(k):
                a = bias[i] + scale[i] * (raw[t, i] * rho)
                if i < N:
                    h_pre[t, i] = 1.0 / (1.0 + math.exp(-a))
                elif i < 2 * N:
                    h_post[t, i - N] = 2.0 / (1.0 + math.exp(-a))
                else:
                    a_res[t, i - 2 * N] = a
            for c in range(C):
                v = h_pre[t, 0] * x[t, 0, c]
                for j in range(1, N):
                    v += h_pre[t, j] * x[t, j, c]
                u[t, c] = v

    @numba.njit(**_FLAGS)
    def backward(x, dX_post, du, dh_pre, dh_post, da_res, h_pre, h_post, raw, inv_rms, scale, dx, da, draw):
        """``dX_post`` of 0 tokens stands for none (a zero gradient)."""
        T, _, C = x.shape
        k, padded = scale.shape[0], raw.shape[1]
        dt = x.dtype.type  # a float64 coef would widen the loops over C
        for t in numba.prange(T):
            for j in range(N):
                s = dh_pre[t, j]
                for c in range(C):
                    s += du[t, c] * x[t, j, c]
                h = h_pre[t, j]
                da[t, j] = s * h * (1.0 - h)
                h = h_post[t, j]
                da[t, N + j] = dh_post[t, j] * h * (1.0 - 0.5 * h)
            for i in range(2 * N, k):
                da[t, i] = da_res[t, i - 2 * N]
            rho = inv_rms[t, 0]
            q = dt(0)
            for i in range(k):
                d = da[t, i] * scale[i]
                draw[t, i] = d * rho
                q += d * raw[t, i]
            for i in range(k, padded):
                draw[t, i] = 0.0
            coef = dt(-q * rho * rho * rho / (N * C))
            for j in range(N):
                h = h_pre[t, j]
                if dX_post.shape[0] == 0:
                    for c in range(C):
                        dx[t, j, c] = coef * x[t, j, c] + h * du[t, c]
                else:
                    for c in range(C):
                        dx[t, j, c] = dX_post[t, j, c] + coef * x[t, j, c] + h * du[t, c]

    return forward, backward


@custom_op("kromhc_vision::cpu_stream_pre_fwd", device_types="cpu")
def _stream_pre_fwd(x: torch.Tensor, raw: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    outs = _forward_outputs(x, bias)
    match_torch_threads()
    _kernels(x.shape[1])[0](*map(numpy_view, (x, raw, scale, bias)), eps, *(o.numpy() for o in outs))
    return outs


def _forward_outputs(x, bias):
    T, n, C = x.shape
    shapes = [(T, C), (T, n), (T, n), (T, bias.shape[0] - 2 * n), (T, 1)]
    return tuple(x.new_empty(s) for s in shapes)


_stream_pre_fwd.register_fake(lambda x, raw, scale, bias, eps: _forward_outputs(x, bias))


@custom_op("kromhc_vision::cpu_stream_pre_bwd", device_types="cpu")
def _stream_pre_bwd(x: torch.Tensor, dX_post: torch.Tensor, du: torch.Tensor, dh_pre: torch.Tensor,
                    dh_post: torch.Tensor, da_res: torch.Tensor, h_pre: torch.Tensor, h_post: torch.Tensor,
                    raw: torch.Tensor, inv_rms: torch.Tensor,
                    scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    outs = _backward_outputs(x, raw, scale)
    match_torch_threads()
    inputs = (x, dX_post, du, dh_pre, dh_post, da_res, h_pre, h_post, raw, inv_rms, scale)
    _kernels(x.shape[1])[1](*map(numpy_view, inputs), *(o.numpy() for o in outs))
    return outs


def _backward_outputs(x, raw, scale):
    return x.new_empty(x.shape), x.new_empty(x.shape[0], scale.shape[0]), torch.empty_like(raw)


_stream_pre_bwd.register_fake(lambda x, dX_post, du, dh_pre, dh_post, da_res, h_pre, h_post, raw, inv_rms, scale:
                              _backward_outputs(x, raw, scale))


def pre_tokens_forward(x, raw, scale, bias, eps: float):
    """``x (T, n, C)``, ``raw (T, k')``, ``scale``, ``bias (k,)`` -> ``u (T, C)``, ``h_pre``, ``h_post (T, n)``,
    ``a_res (T, m)``, ``inv_rms (T, 1)``; one dtype throughout.
    Same as :func:`..pytorch.stream_pre.pre_tokens_forward`.
    """
    return call(_stream_pre_fwd, x, raw, scale, bias, eps)


def pre_tokens_backward(x, dX_post, du, dh_pre, dh_post, da_res, h_pre, h_post, raw, inv_rms, scale):
    """``dx (T, n, C)`` without its GEMM term, ``da (T, k)``, ``draw (T, k')``; ``dX_post`` and ``du`` may be
    None (no gradient). Same as :func:`kromhc_vision.ops.pytorch.stream_pre.pre_tokens_backward`."""
    dX_post = x.new_empty(0, *x.shape[1:]) if dX_post is None else dX_post
    du = x.new_zeros(x.shape[0], x.shape[2]) if du is None else du
    return call(_stream_pre_bwd, x, dX_post, du, dh_pre, dh_post, da_res, h_pre, h_post, raw, inv_rms, scale)


TOKEN_OPS = (pre_tokens_forward, pre_tokens_backward)


def stream_pre(X, norm_weight, proj_weight, scale, bias, eps: float):
    """``stream_pre`` of the PyTorch backend (its GEMMs in BLAS) with the per-token work in these kernels.

    Same signature and values as :func:`kromhc_vision.ops.reference.stream_pre`.
    """
    return _stream_pre_pytorch(X, norm_weight, proj_weight, scale, bias, eps, TOKEN_OPS)
