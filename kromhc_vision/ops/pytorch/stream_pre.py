"""``stream_pre`` on the PyTorch backend: the projection and its two gradient GEMMs in BLAS, the per-token
rest in PyTorch ops, and a hand-written backward that makes fewer passes over the stream state than autograd
would. (The numba backend, :mod:`..numba.stream_pre`, does the whole step, GEMMs included, in one kernel.)

Reference: :func:`kromhc_vision.ops.reference.stream_pre`.
"""
import torch

from ..reference import autocast_off, check_stream_pre_shapes, compute_dtype
from ._once import once_differentiable


def _gained_weight(norm_weight, proj_weight, dtype):
    """``W_g = g * W`` as ``(n*C, k')`` with zero columns after the ``k`` real ones: ``k' = max(16, 8 ceil(k/8))``.

    CPU BLAS (oneDNN/MKL) runs skinny GEMMs of such widths faster than of widths such as 6, 12 or 22.
    """
    k = proj_weight.shape[1]
    weight = norm_weight.to(dtype).unsqueeze(-1) * proj_weight.to(dtype)
    return torch.nn.functional.pad(weight, (0, max(16, -(-k // 8) * 8) - k))


def pre_tokens_forward(x, raw, scale, bias, eps: float):
    """The per-token part of ``stream_pre``'s forward around the GEMM ``raw = vec(x) W_g``::

        rho = (|x|^2 / nC + eps)^-1/2,   a = b + s * raw * rho,   u = H_pre x

    ``x (T, n, C)``, ``raw (T, k')`` (``k' >= k`` columns, see :func:`_gained_weight`), ``scale``,
    ``bias (k,)`` -> ``u (T, C)``, ``h_pre``, ``h_post (T, n)``, ``a_res (T, m)``, ``inv_rms (T, 1)``.
    """
    T, n, C = x.shape
    sum_sq = torch.linalg.vector_norm(x.view(T, n * C), dim=-1, keepdim=True).square_()
    inv_rms = torch.rsqrt(sum_sq.div_(n * C).add_(eps))
    a = torch.addcmul(bias, raw[:, :bias.shape[0]] * inv_rms, scale)
    h_pre = torch.sigmoid(a[:, :n])
    h_post = 2 * torch.sigmoid(a[:, n:2 * n])
    u = torch.bmm(h_pre.unsqueeze(1), x).view(T, C)
    return u, h_pre, h_post, a[:, 2 * n:], inv_rms


def pre_tokens_backward(x, dX_post, du, dh_pre, dh_post, da_res, h_pre, h_post, raw, inv_rms, scale):
    """The backward of :func:`pre_tokens_forward`, and the state gradient from the post step::

        da = [(dH_pre + <du, x_j>) H_pre (1 - H_pre) | dH_post H_post (1 - H_post / 2) | da_res]
        dr = s * da * rho (zero on the padding),   coef = -rho^3 / (nC) * sum_k s_k da_k r_k
        dx = dX_post + coef * x + H_pre^T du

    -> ``dx (T, n, C)`` (the GEMM term ``dr W_g^T`` is the caller's), ``da (T, k)``, ``draw (T, k')``.
    ``dX_post`` and ``du`` may be None (no gradient); the other gradients are tensors.
    """
    T, n, C = x.shape
    if du is not None:
        # per-token dot products as (1, C) @ (C, n), which CPUs run much faster than (n, C) @ (C, 1)
        dh_pre = dh_pre + torch.bmm(du.unsqueeze(1), x.transpose(1, 2)).squeeze(1)
    da = torch.cat([dh_pre * h_pre * (1 - h_pre), dh_post * h_post * (1 - 0.5 * h_post), da_res], dim=-1)
    k = da.shape[1]
    dnormed = da * scale
    draw = torch.nn.functional.pad(dnormed * inv_rms, (0, raw.shape[1] - k))
    coef = (dnormed * raw[:, :k]).sum(-1, keepdim=True).mul_(inv_rms.pow(3)).div_(-n * C).unsqueeze(-1)
    dx = x * coef if dX_post is None else torch.addcmul(dX_post, x, coef)
    if du is not None:
        dx.baddbmm_(h_pre.unsqueeze(-1), du.unsqueeze(1))
    return dx, da, draw


class StreamPre(torch.autograd.Function):
    """:func:`kromhc_vision.ops.reference.stream_pre` with a hand-written backward that makes fewer passes over X.

    Tokens are flattened to ``T``. The projection ``raw = vec(x) W_g`` (``W_g = g * W``) and its two
    gradient GEMMs run in BLAS; the per-token rest in :func:`pre_tokens_forward` and
    :func:`pre_tokens_backward`::

        dx = (dX_post + coef x + H_pre^T du) + dr W_g^T,   dW_g = x^T dr

    A fifth output is ``X`` itself, for the post step: the gradient the post step sends to ``X``
    then arrives here as ``dX_post`` and is added in the first pass that forms ``dx``, instead of
    autograd summing the two ``dX`` in a separate pass over the stream state.
    """

    @staticmethod
    def forward(ctx, X, norm_weight, proj_weight, scale, bias, eps):
        ctx.set_materialize_grads(False)
        n, C = X.shape[-2:]
        lead = X.shape[:-2]
        dtype = compute_dtype(X, proj_weight)
        with autocast_off(X.device):
            x = X.reshape(-1, n, C).to(dtype).contiguous()  # the GEMMs and token ops take (T, n*C) rows
            weight = _gained_weight(norm_weight, proj_weight, dtype)  # (n*C, padded k), kept for the backward
            raw = x.view(-1, n * C) @ weight
            u, h_pre, h_post, a_res, inv_rms = pre_tokens_forward(x, raw, scale.to(dtype), bias.to(dtype), eps)
        ctx.save_for_backward(X, norm_weight, proj_weight, scale, raw, inv_rms, h_pre, h_post, weight)
        ctx.bias_dtype = bias.dtype
        # sizes spelled out: T may be 0. u reaches the branch: not a view (an autograd Function's view output
        # cannot be changed in place, as a branch starting with relu_ would), without a copy
        u = torch.ops.aten._unsafe_view(u, (*lead, C))
        return (u.to(X.dtype), h_pre.view(*lead, n), h_post.view(*lead, n), a_res.reshape(*lead, a_res.shape[1]), X)

    @staticmethod
    @once_differentiable('stream_pre')  # double backward raises DoubleBackwardUnsupportedError
    def backward(ctx, du, dh_pre, dh_post, da_res, dX_post):
        X, norm_weight, proj_weight, scale, raw, inv_rms, h_pre, h_post, weight = ctx.saved_tensors
        n, C = X.shape[-2:]
        T, dtype = raw.shape[0], raw.dtype
        k = proj_weight.shape[1]
        x = X.reshape(T, n, C).to(dtype).contiguous()

        def grad(g, *shape):
            return None if g is None else g.reshape(T, *shape).to(dtype)

        dx, da, draw = pre_tokens_backward(
            x, grad(dX_post, n, C), grad(du, C),
            h_pre.new_zeros(T, n) if dh_pre is None else grad(dh_pre, n),
            h_post.new_zeros(T, n) if dh_post is None else grad(dh_post, n),
            raw.new_zeros(T, k - 2 * n) if da_res is None else grad(da_res, k - 2 * n),
            h_pre, h_post, raw, inv_rms, scale.to(dtype))
        dx.view(T, n * C).addmm_(draw, weight.t())
        # dW_g^T = dr^T x: CPU BLAS runs this (k', T) @ (T, nC) about twice as fast as x^T dr (BENCHMARKS.md)
        dweight = (draw.t() @ x.view(T, n * C))[:k].t()
        return (
            dx.view(X.shape).to(X.dtype),
            (dweight * proj_weight).sum(-1).to(norm_weight.dtype),
            (dweight * norm_weight.unsqueeze(-1)).to(proj_weight.dtype),
            (da * raw[:, :k] * inv_rms).sum(0).to(scale.dtype),
            da.sum(0).to(ctx.bias_dtype),
            None,
        )


def stream_pre(X, norm_weight, proj_weight, scale, bias, eps: float):
    """``u, h_pre, h_post, a_res`` as :func:`kromhc_vision.ops.reference.stream_pre`, then an alias of ``X``.

    Pass that last output (not ``X``) to the post step, so that its gradient joins ``dX`` inside
    ``StreamPre``'s backward (see :class:`StreamPre`).
    """
    check_stream_pre_shapes(X, norm_weight, proj_weight, scale, bias)
    return StreamPre.apply(X, norm_weight, proj_weight, scale, bias, eps)
