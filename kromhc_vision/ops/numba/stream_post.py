"""``stream_post`` on CPU: the depth connection ``X_next = H_res X + H_post^T y``, one pass per direction.

Per token (``X (n, C)``, ``y (C)``, ``H_res (n, n)``, ``H_post (n)``), backward given ``dZ = dX_next``::

    dX = H_res^T dZ,   dy = H_post dZ,   dH_res[i, j] = <dZ_i, X_j>,   dH_post[i] = <dZ_i, y>

Each token's blocks are read once and stay in L1 while all four gradients are formed; accumulation
is in the coefficients' compute dtype. Reference: :func:`kromhc_vision.ops.reference.stream_post`.
"""
import functools

import numba
import torch

from .._custom_ops import call, custom_op, needs_grad, register_stream_post, traced
from ..pytorch._once import once_differentiable
from ..reference import compute_dtype
from ._common import (KERNEL_SCALARS, LINK_ATTRIBUTE, as_dtype, kernel_tensor, match_torch_threads,
                      prefer_vector_width, sized_kernel_tensor, token_array, vector_width)


@functools.lru_cache(maxsize=None)
def _kernels(num_streams: int):
    """The forward and backward kernels for ``num_streams`` streams: ``N`` is a compile-time constant, so the
    loops over streams unroll and each output row is summed in registers (numba caches one pair per ``N`` and
    vector width: :func:`~._common.vector_width`; see :func:`kromhc_vision.ops.numba.stream_pre._kernels` on what
    the closures may hold)."""
    N, WIDTH = num_streams, vector_width()

    @numba.njit(parallel=True, cache=True, error_model="numpy")
    def forward(pX, py, pH, php, pout, T, C, like):
        """The tensors at their addresses ``p*`` (:func:`token_array`), of ``T`` tokens and width ``C``."""
        X, y, H = token_array(pX, like, (T, N, C)), token_array(py, like, (T, C)), token_array(pH, like, (T, N, N))
        hp, out = token_array(php, like, (T, N)), token_array(pout, like, (T, N, C))
        prefer_vector_width(WIDTH)
        for t in numba.prange(T):
            prefer_vector_width(WIDTH)
            for i in range(N):
                a = hp[t, i]
                for c in range(C):
                    s = a * y[t, c]
                    for j in range(N):
                        s += H[t, i, j] * X[t, j, c]
                    out[t, i, c] = s

    @numba.njit(parallel=True, cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
    def backward(pX, py, pH, php, pdZ, pdX, pdy, pdH, pdhp, T, C, has_dX, like):
        """As :func:`forward`; ``has_dX`` False: ``dX`` not formed (the pre step's backward forms it from ``dZ``,
        ``H``)."""
        X, y, H = token_array(pX, like, (T, N, C)), token_array(py, like, (T, C)), token_array(pH, like, (T, N, N))
        hp, dZ = token_array(php, like, (T, N)), token_array(pdZ, like, (T, N, C))
        dX = token_array(pdX, like, (T if has_dX else 0, N, C))
        dy, dH, dhp = token_array(pdy, like, (T, C)), token_array(pdH, like, (T, N, N)), token_array(pdhp, like, (T, N))
        zero = X.dtype.type(0)  # dot products from a typed zero over the full row vectorise better than from term 0
        prefer_vector_width(WIDTH)
        for t in numba.prange(T):
            prefer_vector_width(WIDTH)
            for c in range(C):
                s = zero
                for i in range(N):
                    s += hp[t, i] * dZ[t, i, c]
                dy[t, c] = s
            for j in range(N if has_dX else 0):
                for c in range(C):
                    s = zero
                    for i in range(N):
                        s += H[t, i, j] * dZ[t, i, c]
                    dX[t, j, c] = s
            for i in range(N):
                s = zero
                for c in range(C):
                    s += dZ[t, i, c] * y[t, c]
                dhp[t, i] = s
                for j in range(N):
                    s = zero
                    for c in range(C):
                        s += dZ[t, i, c] * X[t, j, c]
                    dH[t, i, j] = s

    return forward, backward


def _inputs(X, y, h_res, h_post, dtype):
    """The four inputs in ``dtype``, C-contiguous, and their token count ``T``; each one's size checked against
    ``X (T, n, C)``, ``y (T, C)``, ``h_res (T, n, n)``, ``h_post (T, n)`` (the kernels read them by address)."""
    n, C = X.shape[-2:]
    T = X.numel() // (n * C)
    return [kernel_tensor(X, dtype), *(sized_kernel_tensor("stream_post", name, t, T * width, dtype)
                                       for name, t, width in (("y", y, C), ("h_res", h_res, n * n),
                                                              ("h_post", h_post, n)))], T


@custom_op("kromhc_vision::cpu_stream_post_fwd", device_types="cpu")
def _stream_post_fwd(X: torch.Tensor, y: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(X, h_res)
    inputs, T = _inputs(X, y, h_res, h_post, dtype)
    out = torch.empty(X.shape, dtype=dtype)
    match_torch_threads()
    _kernels(X.shape[-2])[0](*(t.data_ptr() for t in inputs), out.data_ptr(), T, X.shape[-1], KERNEL_SCALARS[dtype])
    return as_dtype(out, X.dtype)


@custom_op("kromhc_vision::cpu_stream_post_bwd", device_types="cpu")
def _stream_post_bwd(X: torch.Tensor, y: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor,
                     dout: torch.Tensor, form_dX: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``dX, dy, dh_res, dh_post``; ``form_dX=False``: ``dX`` of 0 tokens, not formed (see
    :class:`LinkedStreamPost`)."""
    dtype = compute_dtype(X, h_res)
    inputs, T = _inputs(X, y, h_res, h_post, dtype)
    dZ = sized_kernel_tensor("stream_post backward", "dout", dout, X.numel(), dtype)
    grads = [torch.empty(t.shape, dtype=dtype)
             for t in (X if form_dX else X.new_empty(0, *X.shape[-2:]), y, h_res, h_post)]
    match_torch_threads()
    _kernels(X.shape[-2])[1](*(t.data_ptr() for t in (*inputs, dZ, *grads)), T, X.shape[-1], form_dX,
                             KERNEL_SCALARS[dtype])
    return tuple(as_dtype(g, t.dtype) for g, t in zip(grads, (X, y, h_res, h_post)))


_stream_post = register_stream_post(_stream_post_fwd, _stream_post_bwd)


class LinkedStreamPost(torch.autograd.Function):
    """The post step on the state the numba pre step returned, in eager mode: the forward and what it saves as
    the plain step's, and a backward that puts ``(dZ, H_res)`` into the pre step's
    :class:`~kromhc_vision.ops.numba._common.PostGradLink` instead of forming and returning ``dX = H_res^T dZ``."""

    @staticmethod
    def forward(ctx, X, y, h_res, h_post, link):
        ctx.save_for_backward(X, y, h_res, h_post)
        ctx.link = link
        return call(_stream_post_fwd, X, y, h_res, h_post)

    @staticmethod
    @once_differentiable("stream_post")
    def backward(ctx, dout):
        X, y, h_res, h_post = ctx.saved_tensors
        # in the kernels' layout once for both backwards (a sum's gradient arrives as a broadcast view)
        dout = as_dtype(dout, compute_dtype(X, h_res)).contiguous()
        _, dy, dh_res, dh_post = call(_stream_post_bwd, X, y, h_res, h_post, dout, False)
        ctx.link.put(dout, h_res)
        return None, dy, dh_res, dh_post, None


def stream_post(X, y, h_res, h_post):
    """``X (..., n, C)``, ``y (..., C)``, ``h_res (..., n, n)``, ``h_post (..., n)`` -> ``X_next (..., n, C)``.

    Same signature and values as :func:`kromhc_vision.ops.reference.stream_post`. On the state the numba pre step
    returned (its link unclaimed), where autograd records the call in eager mode: :class:`LinkedStreamPost`.
    """
    link = getattr(X, LINK_ATTRIBUTE, None)
    if link is not None and not traced((X, y, h_res, h_post)) and needs_grad((X, y, h_res, h_post)) and link.claim():
        return LinkedStreamPost.apply(X, y, h_res, h_post, link)
    return _stream_post(X, y, h_res, h_post)
