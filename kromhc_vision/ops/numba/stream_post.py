"""``stream_post`` on CPU: the depth connection ``X_next = H_res X + H_post^T y``, one pass per direction.

Per token (``X (n, C)``, ``y (C)``, ``H_res (n, n)``, ``H_post (n)``), backward given ``dZ = dX_next``::

    dX = H_res^T dZ,   dy = H_post dZ,   dH_res[i, j] = <dZ_i, X_j>,   dH_post[i] = <dZ_i, y>

Each token's blocks are read once and stay in L1 while all four gradients are formed; accumulation
is in the coefficients' compute dtype. Reference: :func:`kromhc_vision.ops.reference.stream_post`.
"""
import numba
import torch

from .._custom_ops import custom_op, register_stream_post
from ..reference import compute_dtype
from ._common import match_torch_threads, numpy_view


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _forward_kernel(X, y, H, hp, out):
    T, n, C = X.shape
    for t in numba.prange(T):
        for i in range(n):
            a = hp[t, i]
            for c in range(C):
                out[t, i, c] = a * y[t, c]
            for j in range(n):
                h = H[t, i, j]
                for c in range(C):
                    out[t, i, c] += h * X[t, j, c]


@numba.njit(parallel=True, cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _backward_kernel(X, y, H, hp, dZ, dX, dy, dH, dhp):
    T, n, C = X.shape
    zero = X.dtype.type(0)  # dot products from a typed zero over the full row vectorise better than from term 0
    for t in numba.prange(T):
        for c in range(C):
            dy[t, c] = hp[t, 0] * dZ[t, 0, c]
        for i in range(1, n):
            a = hp[t, i]
            for c in range(C):
                dy[t, c] += a * dZ[t, i, c]
        for j in range(n):
            h = H[t, 0, j]
            for c in range(C):
                dX[t, j, c] = h * dZ[t, 0, c]
            for i in range(1, n):
                h = H[t, i, j]
                for c in range(C):
                    dX[t, j, c] += h * dZ[t, i, c]
        for i in range(n):
            s = zero
            for c in range(C):
                s += dZ[t, i, c] * y[t, c]
            dhp[t, i] = s
            for j in range(n):
                s = zero
                for c in range(C):
                    s += dZ[t, i, c] * X[t, j, c]
                dH[t, i, j] = s


def _flat(X, y, h_res, h_post):
    """The four inputs as ``(T, n, C)``, ``(T, C)``, ``(T, n, n)``, ``(T, n)`` in the compute dtype."""
    n, C = X.shape[-2:]
    dtype = compute_dtype(X, h_res)
    return (X.reshape(-1, n, C).to(dtype), y.reshape(-1, C).to(dtype),
            h_res.reshape(-1, n, n).to(dtype), h_post.reshape(-1, n).to(dtype))


@custom_op("kromhc_vision::cpu_stream_post_fwd", device_types="cpu")
def _stream_post_fwd(X: torch.Tensor, y: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor) -> torch.Tensor:
    flat = [t.contiguous() for t in _flat(X, y, h_res, h_post)]
    out = torch.empty_like(flat[0])
    match_torch_threads()
    _forward_kernel(*map(numpy_view, flat), out.numpy())
    return out.view(X.shape).to(X.dtype)


@custom_op("kromhc_vision::cpu_stream_post_bwd", device_types="cpu")
def _stream_post_bwd(X: torch.Tensor, y: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor,
                     dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = [t.contiguous() for t in _flat(X, y, h_res, h_post)]
    dZ = dout.reshape(flat[0].shape).to(flat[0].dtype).contiguous()
    grads = [torch.empty_like(t) for t in flat]
    match_torch_threads()
    _backward_kernel(*map(numpy_view, flat), numpy_view(dZ), *(g.numpy() for g in grads))
    return tuple(g.view(t.shape).to(t.dtype) for g, t in zip(grads, (X, y, h_res, h_post)))


_stream_post = register_stream_post(_stream_post_fwd, _stream_post_bwd)


def stream_post(X, y, h_res, h_post):
    """``X (..., n, C)``, ``y (..., C)``, ``h_res (..., n, n)``, ``h_post (..., n)`` -> ``X_next (..., n, C)``.

    Same signature and values as :func:`kromhc_vision.ops.reference.stream_post`.
    """
    return _stream_post(X, y, h_res, h_post)
