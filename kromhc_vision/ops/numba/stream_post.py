"""``stream_post`` on CPU: the depth connection ``X_next = H_res X + H_post^T y``, one pass per direction.

Per token (``X (n, C)``, ``y (C)``, ``H_res (n, n)``, ``H_post (n)``), backward given ``dZ = dX_next``::

    dX = H_res^T dZ,   dy = H_post dZ,   dH_res[i, j] = <dZ_i, X_j>,   dH_post[i] = <dZ_i, y>

Each token's blocks are read once and stay in L1 while all four gradients are formed; accumulation
is in the coefficients' compute dtype. Each thread's run of tokens is a C function (:func:`_forward_body`,
:func:`_backward_body`) that :func:`~._launch.launch` calls on every thread (BENCHMARKS.md ``compile_time``).
Reference: :func:`kromhc_vision.ops.reference.stream_post`.
"""
import functools

import numba
import torch

from .._custom_ops import call, custom_op, needs_grad, register_stream_post, traced
from ..pytorch._once import once_differentiable
from ..reference import compute_dtype
from ._common import (KERNEL_TYPES, LINK_ATTRIBUTE, as_dtype, kernel_tensor, match_torch_threads,
                      prefer_vector_width, sized_kernel_tensor, token_array, vector_width)
from ._launch import BODY_SIGNATURE, launch


_FLAGS = dict(cache=True, error_model="numpy")
# The bodies' int64 arguments (:mod:`._launch`), by position
FORWARD_ARGS = ("T", "C", "per", "X", "y", "h_res", "h_post", "out")
BACKWARD_ARGS = ("T", "C", "per", "form_dX", "X", "y", "h_res", "h_post", "dZ", "dX", "dy", "dh_res", "dh_post")


@functools.lru_cache(maxsize=None)
def _forward_body(num_streams: int, width: int, dtype):
    """The forward's per-thread body for ``num_streams`` streams, vector width ``width``
    (:func:`~._common.vector_width`) and float dtype ``dtype``: a ``cfunc`` (:mod:`._launch`), its arguments
    :data:`FORWARD_ARGS`, thread ``p`` taking tokens ``p * per .. (p + 1) * per``. ``N`` is a compile-time
    constant, so the loops over streams unroll and each output row is summed in registers. ``N``, ``WIDTH``, ``DT``
    must stay the closure's only free variables (see :func:`kromhc_vision.ops.numba.stream_pre._forward_body`)."""
    N, WIDTH, DT = num_streams, width, dtype

    @numba.cfunc(BODY_SIGNATURE, **_FLAGS)
    def forward(p, a):
        prefer_vector_width(WIDTH)
        like = DT(0)
        T, C, per = a[0], a[1], a[2]
        X, y = token_array(a[3], like, (T, N, C)), token_array(a[4], like, (T, C))
        H = token_array(a[5], like, (T, N, N))
        hp, out = token_array(a[6], like, (T, N)), token_array(a[7], like, (T, N, C))
        for t in range(min(p * per, T), min((p + 1) * per, T)):
            for i in range(N):
                h = hp[t, i]
                for c in range(C):
                    s = h * y[t, c]
                    for j in range(N):
                        s += H[t, i, j] * X[t, j, c]
                    out[t, i, c] = s
        return 1

    return forward


@functools.lru_cache(maxsize=None)
def _backward_body(num_streams: int, width: int, dtype):
    """The backward's per-thread body (as :func:`_forward_body`; arguments :data:`BACKWARD_ARGS`); ``form_dX`` 0:
    ``dX`` not formed (the pre step's backward forms it from ``dZ``, ``H``)."""
    N, WIDTH, DT = num_streams, width, dtype

    @numba.cfunc(BODY_SIGNATURE, fastmath={"reassoc", "contract"}, **_FLAGS)
    def backward(p, a):
        prefer_vector_width(WIDTH)
        like = DT(0)
        T, C, per, has_dX = a[0], a[1], a[2], a[3] != 0
        X, y = token_array(a[4], like, (T, N, C)), token_array(a[5], like, (T, C))
        H = token_array(a[6], like, (T, N, N))
        hp, dZ = token_array(a[7], like, (T, N)), token_array(a[8], like, (T, N, C))
        dX = token_array(a[9], like, (T if has_dX else 0, N, C))
        dy, dH = token_array(a[10], like, (T, C)), token_array(a[11], like, (T, N, N))
        dhp = token_array(a[12], like, (T, N))
        zero = DT(0)  # dot products from a typed zero over the full row vectorise better than from term 0
        for t in range(min(p * per, T), min((p + 1) * per, T)):
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
        return 1

    return backward


@functools.lru_cache(maxsize=None)
def _body_address(make_body, num_streams: int, dtype: torch.dtype) -> int:
    """The address of ``make_body``'s body for ``num_streams`` streams and ``dtype`` at the vector width in force
    when first asked for (:func:`~._common.vector_width`, which reads the CPU's features: not per call)."""
    return make_body(num_streams, vector_width(), KERNEL_TYPES[dtype]).address


def _run(make_body, num_streams, dtype, T, C, args):
    """``make_body``'s body (:func:`_body_address`) on the threads PyTorch uses, each on a contiguous run of the
    ``T`` tokens; ``args``: the body's arguments after ``T, C, per``."""
    threads = match_torch_threads()
    launch(_body_address(make_body, num_streams, dtype), threads, (T, C, (T + threads - 1) // threads, *args))


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
    _run(_forward_body, X.shape[-2], dtype, T, X.shape[-1], [t.data_ptr() for t in (*inputs, out)])
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
    _run(_backward_body, X.shape[-2], dtype, T, X.shape[-1],
         [int(form_dX), *(t.data_ptr() for t in (*inputs, dZ, *grads))])
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
