"""The stream-state gradient of ``stream_pre`` on CPU, apart from its GEMM term, in one pass.

Per token, with ``x`` the stream state ``(n, C)``, ``du`` the gradient of ``u = H_pre X``, ``dX_post``
the gradient the post step sends to the same state and ``coef`` the RMSNorm term (see
:class:`kromhc_vision.mixing.StreamPre`)::

    dx[j] = dX_post[j] + coef * x[j] + H_pre[j] * du

PyTorch makes two passes over ``dx`` for this (an ``addcmul`` and a rank-1 ``baddbmm``); the
GEMM term ``dr W_g^T`` is then added in place by BLAS. Reference: the same lines of
:meth:`kromhc_vision.mixing.StreamPre.backward`.
"""
import numba
import torch

from ._common import match_torch_threads, numpy_view


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _kernel(dX_post, x, coef, h_pre, du, dx):
    T, n, C = x.shape
    for t in numba.prange(T):
        a = coef[t]
        for j in range(n):
            h = h_pre[t, j]
            for c in range(C):
                dx[t, j, c] = dX_post[t, j, c] + a * x[t, j, c] + h * du[t, c]


@torch.library.custom_op("kromhc_vision::cpu_stream_pre_dx", mutates_args=(), device_types="cpu")
def stream_pre_dx(dX_post: torch.Tensor, x: torch.Tensor, coef: torch.Tensor, h_pre: torch.Tensor,
                  du: torch.Tensor) -> torch.Tensor:
    """``dX_post, x (T, n, C)``, ``coef (T,)``, ``h_pre (T, n)``, ``du (T, C)``, one dtype -> ``dx (T, n, C)``."""
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    match_torch_threads()
    _kernel(*map(numpy_view, (dX_post, x, coef, h_pre, du)), dx.numpy())
    return dx


@stream_pre_dx.register_fake
def _(dX_post, x, coef, h_pre, du):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
