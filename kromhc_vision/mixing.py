"""Reference (PyTorch) implementation of the two stream-mixing steps every variant shares.

``stream_pre``: the width connection and the coefficient logits, from the stream state only::

    x~     = RMSNorm(vec(X))                      # over n*C values, gain g
    a      = s * (x~ W) + b                       # (..., 2n + m): [a_pre | a_post | a_res]
    H_pre  = sigmoid(a_pre),  H_post = 2 sigmoid(a_post)
    u      = H_pre X                              # (..., C)

``stream_post``: the depth connection, ``X_next = H_res X + H_post^T y``.

Coefficients and accumulation run in float32 (float64 if the inputs are float64) with autocast
off; ``u`` and ``X_next`` come back in the stream dtype. The Triton kernels compute the same.
"""
import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def stream_pre_reference(X, norm_weight, proj_weight, scale, bias, eps: float):
    """``X (..., n, C)`` -> ``u (..., C)``, ``h_pre (..., n)``, ``h_post (..., n)``, ``a_res (..., m)``.

    ``norm_weight``: ``(n*C,)``; ``proj_weight``: ``(n*C, 2n+m)``; ``scale``, ``bias``: ``(2n+m,)``.
    """
    n = X.shape[-2]
    dtype = compute_dtype(X, proj_weight)
    with torch.autocast(X.device.type, enabled=False):
        Xc = X.to(dtype)
        flat = Xc.flatten(-2)
        inv_rms = torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + eps)
        weight = norm_weight.to(dtype).unsqueeze(-1) * proj_weight.to(dtype)
        a = torch.addcmul(bias.to(dtype), (flat @ weight) * inv_rms, scale.to(dtype))
        h_pre = torch.sigmoid(a[..., :n])
        h_post = 2 * torch.sigmoid(a[..., n:2 * n])
        u = (h_pre.unsqueeze(-2) @ Xc).squeeze(-2)
    return u.to(X.dtype), h_pre, h_post, a[..., 2 * n:]


def stream_post_reference(X, y, h_res, h_post):
    """``X (..., n, C)``, ``y (..., C)``, ``h_res (..., n, n)``, ``h_post (..., n)`` -> ``X_next (..., n, C)``."""
    dtype = compute_dtype(X, h_res)
    with torch.autocast(X.device.type, enabled=False):
        out = torch.addcmul(h_res.to(dtype) @ X.to(dtype), h_post.to(dtype).unsqueeze(-1), y.to(dtype).unsqueeze(-2))
    return out.to(X.dtype)


def _gained_weight(norm_weight, proj_weight, dtype):
    """``W_g = g * W`` as ``(n*C, k')`` with zero columns after the ``k`` real ones: ``k' = max(16, 8 ceil(k/8))``.

    Skinny GEMMs with such widths run 1.3-4x faster on CPU (oneDNN/MKL) than with k = 6, 12 or 22.
    """
    k = proj_weight.shape[1]
    weight = norm_weight.to(dtype).unsqueeze(-1) * proj_weight.to(dtype)
    return torch.nn.functional.pad(weight, (0, max(16, -(-k // 8) * 8) - k))


class StreamPre(torch.autograd.Function):
    """:func:`stream_pre_reference` with a hand-written backward that makes fewer passes over X.

    Tokens are flattened to ``T``; with ``r = x W_g`` (``W_g = g * W``) and ``rho = (|x|^2/nC + eps)^-1/2``::

        a = b + s * r * rho,   u = H_pre X
        dr = s * da * rho,     drho = sum_k s_k da_k r_k
        dx = dr W_g^T - drho rho^3 x / (nC) + H_pre^T du (+ dX_post)

    A fifth output is ``X`` itself, for the post step: the gradient the post step sends to ``X``
    then arrives here as ``dX_post`` and is added in the first pass that forms ``dx``, instead of
    autograd summing the two ``dX`` in a separate pass over the stream state. ``dx_op``, if given,
    forms ``dX_post + coef x + H_pre^T du`` in one pass (``dx_op(dX_post, x, coef, h_pre, du)``, all
    ``(T, ...)``; see :mod:`kromhc_vision.cpu.stream_pre_dx`) where PyTorch makes two.
    """

    @staticmethod
    def forward(ctx, X, norm_weight, proj_weight, scale, bias, eps, dx_op=None):
        ctx.set_materialize_grads(False)
        ctx.dx_op = dx_op
        n, C = X.shape[-2:]
        dtype = compute_dtype(X, proj_weight)
        with torch.autocast(X.device.type, enabled=False):
            x = X.reshape(-1, n * C).to(dtype)
            inv_rms = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(n * C).add_(eps))
            raw = x @ _gained_weight(norm_weight, proj_weight, dtype)  # (T, padded k)
            a = torch.addcmul(bias.to(dtype), raw[:, :bias.shape[0]] * inv_rms, scale.to(dtype))
            h_pre = torch.sigmoid(a[:, :n])
            h_post = 2 * torch.sigmoid(a[:, n:2 * n])
            u = torch.bmm(h_pre.unsqueeze(1), x.view(-1, n, C)).view(*X.shape[:-2], C)
        ctx.save_for_backward(X, norm_weight, proj_weight, scale, raw, inv_rms, h_pre, h_post)
        lead = X.shape[:-2]
        a_res = a[:, 2 * n:].reshape(*lead, a.shape[1] - 2 * n)  # sizes spelled out: T may be 0
        return u.to(X.dtype), h_pre.view(*lead, n), h_post.view(*lead, n), a_res, X

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, du, dh_pre, dh_post, da_res, dX_post):
        X, norm_weight, proj_weight, scale, raw, inv_rms, h_pre, h_post = ctx.saved_tensors
        n, C = X.shape[-2:]
        T, dtype = raw.shape[0], raw.dtype
        k = proj_weight.shape[1]
        x = X.reshape(-1, n * C).to(dtype)
        dh_pre = h_pre.new_zeros(T, n) if dh_pre is None else dh_pre.reshape(T, n).to(dtype)
        if du is not None:
            du = du.reshape(T, C).to(dtype)
            # per-token dot products as (1, C) @ (C, n): on CPU 8x faster than (n, C) @ (C, 1)
            dh_pre = dh_pre + torch.bmm(du.unsqueeze(1), x.view(T, n, C).transpose(1, 2)).squeeze(1)
        da = torch.cat([
            dh_pre * h_pre * (1 - h_pre),
            h_post.new_zeros(T, n) if dh_post is None else dh_post.reshape(T, n) * h_post * (1 - 0.5 * h_post),
            raw.new_zeros(T, k - 2 * n) if da_res is None else da_res.reshape(T, k - 2 * n),
        ], dim=-1)
        dnormed = da * scale.to(dtype)
        draw = torch.nn.functional.pad(dnormed * inv_rms, (0, raw.shape[1] - k))
        coef = (dnormed * raw[:, :k]).sum(-1, keepdim=True).mul_(inv_rms.pow(3)).div_(-n * C)
        weight = _gained_weight(norm_weight, proj_weight, dtype)
        # passes over dx: one reading dX_post and x, one adding H_pre^T du (fused with the first by
        # dx_op), and the GEMM accumulating in place
        if ctx.dx_op is not None and dX_post is not None and du is not None:
            dx = ctx.dx_op(dX_post.reshape(T, n, C).to(dtype), x.view(T, n, C), coef.view(T), h_pre, du).view(T, n * C)
        else:
            dx = x * coef if dX_post is None else torch.addcmul(dX_post.reshape(T, n * C).to(dtype), x, coef)
            if du is not None:
                dx.view(T, n, C).baddbmm_(h_pre.unsqueeze(-1), du.unsqueeze(1))
        dx.addmm_(draw, weight.t())
        dweight = (x.t() @ draw)[:, :k]
        return (
            dx.view(X.shape).to(X.dtype),
            (dweight * proj_weight).sum(-1).to(norm_weight.dtype),
            (dweight * norm_weight.unsqueeze(-1)).to(proj_weight.dtype),
            (da * raw[:, :k] * inv_rms).sum(0).to(scale.dtype),
            da.sum(0).to(scale.dtype),
            None,
            None,
        )


class StreamPost(torch.autograd.Function):
    """:func:`stream_post_reference` as batched products over tokens ``T``::

        X_next = H_res X + H_post^T y
        dX = H_res^T dZ,  dy = H_post dZ,  dH_res = dZ X^T,  dH_post = dZ y^T
    """

    @staticmethod
    def forward(ctx, X, y, h_res, h_post):
        n, C = X.shape[-2:]
        dtype = compute_dtype(X, h_res)
        with torch.autocast(X.device.type, enabled=False):
            out = torch.bmm(h_res.reshape(-1, n, n).to(dtype), X.reshape(-1, n, C).to(dtype))
            out.baddbmm_(h_post.reshape(-1, n, 1).to(dtype), y.reshape(-1, 1, C).to(dtype))
        ctx.save_for_backward(X, y, h_res, h_post)
        return out.view(X.shape).to(X.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        X, y, h_res, h_post = ctx.saved_tensors
        n, C = X.shape[-2:]
        dtype = compute_dtype(X, h_res)
        d = dout.reshape(-1, n, C).to(dtype)
        x = X.reshape(-1, n, C).to(dtype)
        h = h_res.reshape(-1, n, n).to(dtype)
        return (
            torch.bmm(h.transpose(1, 2), d).view(X.shape).to(X.dtype),
            torch.bmm(h_post.reshape(-1, 1, n).to(dtype), d).view(y.shape).to(y.dtype),
            torch.bmm(d, x.transpose(1, 2)).view(h_res.shape).to(h_res.dtype),
            torch.bmm(y.reshape(-1, 1, C).to(dtype), d.transpose(1, 2)).view(h_post.shape).to(h_post.dtype),
        )


def stream_pre_torch(X, norm_weight, proj_weight, scale, bias, eps: float, dx_op=None):
    """The CPU / PyTorch path of ``stream_pre``: the reference's four outputs, then ``X`` for the post step.

    Pass that last output (not ``X``) to the post step, so that its gradient joins ``dX`` inside
    ``StreamPre``'s backward (see :class:`StreamPre`, also for ``dx_op``).
    """
    return StreamPre.apply(X, norm_weight, proj_weight, scale, bias, eps, dx_op)


def stream_post_torch(X, y, h_res, h_post):
    """The CPU / PyTorch path of ``stream_post`` (same signature as the reference)."""
    return StreamPost.apply(X, y, h_res, h_post)
