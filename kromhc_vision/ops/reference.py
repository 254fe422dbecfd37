"""The three stream-mixing ops as plain PyTorch, differentiated by autograd: the definitions every backend
(``pytorch/``, ``triton/``, ``numba/``) is tested against.

``stream_pre``: the width connection and the coefficient logits, from the stream state only::

    x~     = RMSNorm(vec(X))                      # over n*C values, gain g
    a      = s * (x~ W) + b                       # (..., 2n + m): [a_pre | a_post | a_res]
    H_pre  = sigmoid(a_pre),  H_post = 2 sigmoid(a_post)
    u      = H_pre X                              # (..., C)

``stream_post``: the depth connection, ``X_next = H_res X + H_post^T y``.

``sinkhorn``: mHC's ``H_res``, Sinkhorn-Knopp on ``exp(logits)`` in the log domain.

Coefficients and accumulation run in :func:`compute_dtype` (float32, float64 if an input is float64)
with autocast off; ``u`` and ``X_next`` come back in the stream dtype. Every backend computes the same.
"""
import contextlib
import math

import torch

from ..streams import is_int  # the one integer check, defined in the maths layer (README Layout)


def autocast_off(device: torch.device):
    """A context with autocast disabled on ``device`` (nothing to disable where autocast does not exist, e.g. meta,
    or is off: entering ``torch.autocast`` costs microseconds, and a connection enters this three times a call)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64: the dtype of the coefficients and of every sum."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_floating(op: str, **tensors) -> None:
    """Raise ``ValueError`` naming ``op`` and the tensor unless every one of ``tensors`` is a floating-point tensor
    (an integer one would be truncated on the way out: ``u``, ``H_res`` of zeros and ones)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {got}")


def check_stream_pre_args(X, norm_weight, proj_weight, scale, bias) -> None:
    """:func:`check_stream_pre_shapes`, and every tensor floating-point with ``X`` at least 2-d: what the public op
    checks once (each backend checks the shapes, as it is also called alone)."""
    check_floating("stream_pre", X=X, norm_weight=norm_weight, proj_weight=proj_weight, scale=scale, bias=bias)
    if X.dim() < 2:
        raise ValueError(f"stream_pre expects a stream state X of shape (..., n, C), got {tuple(X.shape)}")
    check_stream_pre_shapes(X, norm_weight, proj_weight, scale, bias)


def check_stream_pre_shapes(X, norm_weight, proj_weight, scale, bias) -> None:
    """Raise ``ValueError`` naming the tensor and the shape it must have unless the parameters fit ``X (..., n, C)``
    and hold ``k >= 2n`` coefficients (the numba kernels, which read them by address, check sizes themselves)."""
    n, C = X.shape[-2:]
    k = proj_weight.shape[-1]
    if proj_weight.dim() != 2 or k < 2 * n:
        raise ValueError(f"stream_pre: proj_weight of shape {tuple(proj_weight.shape)} for X (..., {n}, {C}); it "
                         f"must be (n*C, k) = ({n * C}, k) with k >= 2n = {2 * n} coefficients")
    for name, t, shape in (("norm_weight", norm_weight, (n * C,)), ("proj_weight", proj_weight, (n * C, k)),
                           ("scale", scale, (k,)), ("bias", bias, (k,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"stream_pre: {name} has shape {tuple(t.shape)}; for X (..., {n}, {C}) and {k} "
                             f"coefficients it must be {shape}")


def check_stream_post_shapes(X, y, h_res, h_post) -> None:
    """Raise ``ValueError`` naming the tensor and the shape it must have unless, for ``X (..., n, C)``, ``y`` is
    ``(..., C)``, ``h_res`` ``(..., n, n)`` and ``h_post`` ``(..., n)`` with ``X``'s leading dims, all floating."""
    check_floating("stream_post", X=X, y=y, h_res=h_res, h_post=h_post)
    if X.dim() < 2:
        raise ValueError(f"stream_post expects a stream state X of shape (..., n, C), got {tuple(X.shape)}")
    lead, (n, C) = tuple(X.shape[:-2]), X.shape[-2:]
    for name, t, shape in (("y", y, lead + (C,)), ("h_res", h_res, lead + (n, n)), ("h_post", h_post, lead + (n,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"stream_post: {name} has shape {tuple(t.shape)}; for X {tuple(X.shape)} it must be "
                             f"{shape}")


def check_square_logits(logits) -> None:
    """Raise ``ValueError`` naming the shape unless ``logits`` is ``(..., n, n)`` (the Sinkhorn backends check this
    too, as they are also called alone)."""
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn expects logits of shape (..., n, n), got {tuple(logits.shape)}")


def check_sinkhorn_args(logits, num_iters) -> None:
    """Raise ``ValueError`` naming the value unless ``logits`` is floating ``(..., n, n)`` and ``num_iters`` an
    int >= 1 (0 iterations would return ``exp(logits)``, not normalised at all)."""
    check_floating("sinkhorn", logits=logits)
    check_square_logits(logits)
    if not is_int(num_iters) or num_iters < 1:
        raise ValueError(f"sinkhorn: num_iters must be an int >= 1, got {num_iters!r}")


def check_permutation_mix_args(logits, perms) -> None:
    """Raise ``ValueError`` naming the value unless ``perms`` is a non-empty list of ``(i_k!, i_k, i_k)`` tensors
    (``permutation_matrices(i_k)``: the kernel backends use their own tables of all ``i_k!``) and ``logits``
    floating ``(..., sum_k i_k!)``. Loops, not generators: torch.compile(fullgraph=True) traces them."""
    check_floating("permutation_mix", logits=logits)
    valid = isinstance(perms, (list, tuple)) and len(perms) > 0
    m, factors = 0, []
    for p in perms if valid else ():
        if not isinstance(p, torch.Tensor) or p.dim() != 3 or p.shape[1] != p.shape[2] \
                or p.shape[0] != math.factorial(p.shape[1]):
            valid = False
            break
        m += p.shape[0]
        factors.append(p.shape[-1])
    if not valid:
        raise ValueError("permutation_mix expects perms = [permutation_matrices(i_k), ...], a non-empty list of "
                         f"(i_k!, i_k, i_k) tensors, got {perms!r:.200}")
    if logits.dim() < 1 or logits.shape[-1] != m:
        raise ValueError(f"permutation_mix with factors {factors} expects logits of shape (..., {m}), got "
                         f"{tuple(logits.shape)}")


def stream_pre(X, norm_weight, proj_weight, scale, bias, eps: float):
    """``X (..., n, C)`` -> ``u (..., C)``, ``h_pre (..., n)``, ``h_post (..., n)``, ``a_res (..., m)``, ``X``.

    ``norm_weight``: ``(n*C,)``; ``proj_weight``: ``(n*C, 2n+m)``; ``scale``, ``bias``: ``(2n+m,)``.
    The fifth output is the stream state to hand to ``stream_post`` (here ``X`` itself; a backend may
    return an alias of ``X`` that routes the post step's gradient through its own backward).
    """
    check_stream_pre_args(X, norm_weight, proj_weight, scale, bias)
    n = X.shape[-2]
    dtype = compute_dtype(X, proj_weight)
    with autocast_off(X.device):
        Xc = X.to(dtype)
        flat = Xc.flatten(-2)
        inv_rms = torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + eps)
        weight = norm_weight.to(dtype).unsqueeze(-1) * proj_weight.to(dtype)
        a = torch.addcmul(bias.to(dtype), (flat @ weight) * inv_rms, scale.to(dtype))
        h_pre = torch.sigmoid(a[..., :n])
        h_post = 2 * torch.sigmoid(a[..., n:2 * n])
        u = (h_pre.unsqueeze(-2) @ Xc).squeeze(-2)
    return u.to(X.dtype), h_pre, h_post, a[..., 2 * n:], X


def stream_post(X, y, h_res, h_post):
    """``X (..., n, C)``, ``y (..., C)``, ``h_res (..., n, n)``, ``h_post (..., n)`` -> ``X_next (..., n, C)``."""
    dtype = compute_dtype(X, h_res)
    with autocast_off(X.device):
        out = torch.addcmul(h_res.to(dtype) @ X.to(dtype), h_post.to(dtype).unsqueeze(-1), y.to(dtype).unsqueeze(-2))
    return out.to(X.dtype)


def sinkhorn(logits: torch.Tensor, num_iters: int) -> torch.Tensor:
    """``(..., n, n)`` logits -> ``exp(L_T)`` after ``num_iters`` row-then-column log normalisations::

        L <- L - logsumexp(L, rows),   L <- L - logsumexp(L, columns)

    Runs in the logits' dtype. Columns of the result sum to 1 to rounding; rows only approximately
    (the error shrinks with ``num_iters``).
    """
    L = logits
    for _ in range(num_iters):
        L = torch.log_softmax(L, dim=-1)
        L = torch.log_softmax(L, dim=-2)
    return L.exp()
