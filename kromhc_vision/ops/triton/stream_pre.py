"""Fused ``stream_pre``: RMS norm, coefficient projection, sigmoids and the width connection.

Per token, with ``x = vec(X)`` (``D = n*C`` values), ``W_g = g * W`` (``D x K``, ``K = 2n + m``)::

    r = x W_g,  rho = (|x|^2 / D + eps)^-1/2,  a = b + s * r * rho
    coef = [sigmoid(a[:n]) | 2 sigmoid(a[n:2n]) | a[2n:]] = [H_pre | H_post | a_res]
    u = H_pre X

Backward, given ``du`` and ``dcoef``::

    da = [(dH_pre + X du) * H_pre (1 - H_pre) | dH_post * H_post (1 - H_post / 2) | da_res]
    dr = s * da * rho,   dx = dr W_g^T - (sum_k s_k da_k r_k) rho^3 x / D + H_pre^T du
    db = sum_t da,  ds = sum_t da * r * rho,  G = sum_t x^T dr,  dW = g * G,  dg = sum_k G * W

The forward reads X twice per token block (the second pass, for ``u``, needs the finished
reduction and hits L2); the backward recomputes ``r``, ``rho`` and ``a`` instead of storing them.
Reference: :func:`kromhc_vision.ops.reference.stream_pre`.
"""
import torch
import triton
import triton.language as tl

from ..reference import check_stream_pre_shapes, compute_dtype
from ._common import (autotune, configs, dot_precision, nbytes, num_programs_hint, on_device, prune_by_resources,
                      tl_dtype)

MIN_BLOCK_T = 16  # tl.dot needs M >= 16; the per-program partial buffers are sized for it

# Pipelined (2-3 stage) configs for the common widths K <= 128; 1-stage small tiles for large K (mHC-lite n = 6:
# K = 732, padded 1024; HC / mHC n = 16: K = 288, padded 512), where pipelined weight tiles overflow shared
# memory. No BLOCK_C = 128 tiles and no 8-warp 16 x 16 tiles: in Triton 3.8 they spill at every K (check-kernels).
_CONFIGS = configs(
    [(dict(BLOCK_T=16, BLOCK_C=64), 4), (dict(BLOCK_T=32, BLOCK_C=64), 4), (dict(BLOCK_T=64, BLOCK_C=64), 8),
     (dict(BLOCK_T=16, BLOCK_C=32), 4, 2), (dict(BLOCK_T=16, BLOCK_C=32), 4, 1), (dict(BLOCK_T=16, BLOCK_C=16), 4, 1)],
    dict(BLOCK_T=MIN_BLOCK_T, BLOCK_C=32),
)


def _pre_resources(backward: bool):
    """``(shared bytes, registers per thread)`` of a pre-kernel config, fitted to Triton 3.8's sm_80 / sm_90
    compiles (``check-kernels`` measures the real values). Shared memory: each pipeline stage (when there are
    two or more) buffers the weight tile ``(BLOCK_C, KP)`` and the stream tile ``(BLOCK_T, BLOCK_C)`` in their
    storage dtypes; on top, the dot operands and the layout conversion of the ``(BLOCK_T, KP)`` accumulators
    (``r``; and ``xdu``, ``dr`` in the backward). Registers: the accumulators, the tiles of one iteration and
    the tiles in flight for the later stages, in the compute dtype, spread over the threads."""
    def estimate(a, num_warps, num_stages):
        bt, bc, kp = a["BLOCK_T"], a["BLOCK_C"], a["KP"]
        xb, wb, cb = nbytes(a["X"].dtype), nbytes(a["W"].dtype), nbytes(a["CD"])
        staged = num_stages * (bc * kp * wb + bt * bc * xb) if num_stages > 1 else 0
        acc = ((4 if bt >= 64 else 3 if bt >= 32 else 2.5) if backward else 2) * bt * kp * cb
        shared = staged + max(bc * kp * cb, acc) + 1024
        tiles = (3 if backward else 1) * bt * kp + bc * kp + 3 * bt * bc + (num_stages - 1) * (bc * kp + bt * bc)
        return shared, tiles * (cb // 4) / (32 * num_warps)
    return prune_by_resources(estimate)


def _dw_resources(a, num_warps, num_stages):
    """As :func:`_pre_resources` for the ``x^T dr`` GEMM: stages buffer ``dr (BLOCK_T, KP)`` and
    ``x (BLOCK_T, BLOCK_D)``; the ``(BLOCK_D, KP)`` accumulator is converted for the store."""
    bt, bd, kp = a["BLOCK_T"], a["BLOCK_D"], a["KP"]
    xb, cb = nbytes(a["X"].dtype), nbytes(a["CD"])
    staged = num_stages * (bt * kp * cb + bt * bd * xb) if num_stages > 1 else 0
    shared = staged + max(2 * bt * kp * cb + bt * bd * cb, bd * kp * cb) + 1024
    regs = (bd * kp + bt * kp + 2 * bt * bd) * (cb // 4) / (32 * num_warps)
    return shared, regs


@triton.jit
def _project(X, G, W, rows, row_mask, cols, DU, n: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
             KP: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr, WITH_DU: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """``r = x W_g`` (BLOCK_T, KP), ``|x|^2`` (BLOCK_T,) and, if WITH_DU, ``X_i . du`` in column i."""
    r = tl.zeros((BLOCK_T, KP), CD)
    ss = tl.zeros((BLOCK_T,), CD)
    xdu = tl.zeros((BLOCK_T, KP), CD)
    for i in range(n):
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            cm = cc < C
            m = row_mask[:, None] & cm[None, :]
            x = tl.load(X + rows[:, None] * (n * C) + i * C + cc[None, :], mask=m, other=0).to(CD)
            d = i * C + cc
            g = tl.load(G + d, mask=cm, other=0).to(CD)
            w = tl.load(W + d[:, None] * K + cols[None, :], mask=cm[:, None] & (cols[None, :] < K), other=0).to(CD)
            r += tl.dot(x, w * g[:, None], input_precision=PREC)
            ss += tl.sum(x * x, 1)
            if WITH_DU:
                du = tl.load(DU + rows[:, None] * C + cc[None, :], mask=m, other=0).to(CD)
                xdu += tl.where(cols[None, :] == i, tl.sum(x * du, 1)[:, None], 0)
    return r, ss, xdu


@triton.jit
def _coefficients(r, ss, S, B, cols, eps, n: tl.constexpr, C: tl.constexpr, K: tl.constexpr, CD: tl.constexpr):
    """``rho``, ``s``, ``sigmoid(a)`` and ``coef`` from the projection and the sum of squares."""
    rho = tl.math.rsqrt(ss / (n * C) + eps)
    s = tl.load(S + cols, mask=cols < K, other=0).to(CD)
    b = tl.load(B + cols, mask=cols < K, other=0).to(CD)
    a = b[None, :] + s[None, :] * (r * rho[:, None])
    sig = tl.sigmoid(a)
    coef = tl.where(cols[None, :] < n, sig, tl.where(cols[None, :] < 2 * n, 2 * sig, a))
    return rho, s, sig, coef


@autotune(_CONFIGS, key=["n", "C", "K"], prune_configs_by=_pre_resources(False))
@triton.jit
def _stream_pre_fwd_kernel(X, G, W, S, B, U, COEF, T, eps, n: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
                           KP: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    rows = rows.to(tl.int64)
    cols = tl.arange(0, KP)
    r, ss, _ = _project(X, G, W, rows, row_mask, cols, X, n, C, K, KP, CD, PREC, False, BLOCK_T, BLOCK_C)
    rho, s, sig, coef = _coefficients(r, ss, S, B, cols, eps, n, C, K, CD)
    tl.store(COEF + rows[:, None] * K + cols[None, :], coef, mask=row_mask[:, None] & (cols[None, :] < K))
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        m = row_mask[:, None] & (cc[None, :] < C)
        u = tl.zeros((BLOCK_T, BLOCK_C), CD)
        for i in range(n):
            h = tl.sum(tl.where(cols[None, :] == i, sig, 0), 1)
            x = tl.load(X + rows[:, None] * (n * C) + i * C + cc[None, :], mask=m, other=0).to(CD)
            u += h[:, None] * x
        tl.store(U + rows[:, None] * C + cc[None, :], u.to(U.dtype.element_ty), mask=m)


# PART has a row per program of the smallest BLOCK_T; a larger block writes fewer rows and the launcher sums
# them all. The autotuner's benchmark runs of other configs write the other rows, so it zeroes PART before
# each of them and again before the launch of the winner (reset_to_zero).
@autotune(_CONFIGS, key=["n", "C", "K"], prune_configs_by=_pre_resources(True),
                 reset_to_zero=["PART"])
@triton.jit
def _stream_pre_bwd_kernel(X, G, W, S, B, DU, DCOEF, DX, DR, PART, T, eps, n: tl.constexpr, C: tl.constexpr,
                           K: tl.constexpr, KP: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Writes ``dX``, ``dr`` (T, KP) for the ``G`` GEMM, and per-program sums of ``da``, ``da r rho`` to PART."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    rows = rows.to(tl.int64)
    cols = tl.arange(0, KP)
    r, ss, xdu = _project(X, G, W, rows, row_mask, cols, DU, n, C, K, KP, CD, PREC, True, BLOCK_T, BLOCK_C)
    # padding rows (x = 0): a finite rho, else eps = 0 gives 0 * inf = NaN in their da, which PART sums over
    ss = tl.where(row_mask, ss, n * C)
    rho, s, sig, coef = _coefficients(r, ss, S, B, cols, eps, n, C, K, CD)
    dcoef = tl.load(DCOEF + rows[:, None] * K + cols[None, :], mask=row_mask[:, None] & (cols[None, :] < K),
                    other=0).to(CD)
    da = tl.where(cols[None, :] < n, (dcoef + xdu) * sig * (1 - sig),
                  tl.where(cols[None, :] < 2 * n, dcoef * coef * (1 - 0.5 * coef), dcoef))
    tl.store(PART + pid * 2 * KP + cols, tl.sum(da, 0))
    tl.store(PART + pid * 2 * KP + KP + cols, tl.sum(da * (r * rho[:, None]), 0))
    ds = da * s[None, :]
    dr = ds * rho[:, None]
    tl.store(DR + rows[:, None] * KP + cols[None, :], dr, mask=row_mask[:, None])
    coef_x = -tl.sum(ds * r, 1) * (rho * rho * rho) / (n * C)
    for i in range(n):
        h = tl.sum(tl.where(cols[None, :] == i, sig, 0), 1)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            cm = cc < C
            m = row_mask[:, None] & cm[None, :]
            d = i * C + cc
            g = tl.load(G + d, mask=cm, other=0).to(CD)
            w = tl.load(W + d[:, None] * K + cols[None, :], mask=cm[:, None] & (cols[None, :] < K), other=0).to(CD)
            x = tl.load(X + rows[:, None] * (n * C) + d[None, :], mask=m, other=0).to(CD)
            du = tl.load(DU + rows[:, None] * C + cc[None, :], mask=m, other=0).to(CD)
            dx = tl.dot(dr, tl.trans(w * g[:, None]), input_precision=PREC)
            dx += coef_x[:, None] * x + h[:, None] * du
            tl.store(DX + rows[:, None] * (n * C) + d[None, :], dx.to(DX.dtype.element_ty), mask=m)


@autotune(configs([(dict(BLOCK_T=32, BLOCK_D=64), 4), (dict(BLOCK_T=64, BLOCK_D=64), 4),
                          (dict(BLOCK_T=64, BLOCK_D=128), 8), (dict(BLOCK_T=32, BLOCK_D=16), 8),
                          (dict(BLOCK_T=16, BLOCK_D=64), 4), (dict(BLOCK_T=16, BLOCK_D=32), 4, 1),
                          (dict(BLOCK_T=16, BLOCK_D=16), 4, 1), (dict(BLOCK_T=16, BLOCK_D=32), 8, 1)],
                         dict(BLOCK_T=MIN_BLOCK_T, BLOCK_D=32)),
                 key=["D", "KP"], prune_configs_by=prune_by_resources(_dw_resources))
@triton.jit
def _stream_pre_dw_kernel(X, DR, PART, T, D: tl.constexpr, KP: tl.constexpr, CD: tl.constexpr,
                          PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Split-T GEMM ``PART[split] = sum_{t in split} x_t^T dr_t`` (D, KP); the splits are summed in torch."""
    pid_s = tl.program_id(1)
    dd = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = dd < D
    cols = tl.arange(0, KP)
    acc = tl.zeros((BLOCK_D, KP), CD)
    for t0 in range(pid_s * BLOCK_T, T, tl.num_programs(1) * BLOCK_T):
        tt = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        tm = tt < T
        x = tl.load(X + tt[:, None] * D + dd[None, :], mask=tm[:, None] & dm[None, :], other=0).to(CD)
        dr = tl.load(DR + tt[:, None] * KP + cols[None, :], mask=tm[:, None], other=0)
        acc += tl.dot(tl.trans(x), dr, input_precision=PREC)
    tl.store(PART + pid_s * D * KP + dd[:, None] * KP + cols[None, :], acc, mask=dm[:, None])


def _dims(X, proj_weight):
    n, C = X.shape[-2:]
    K = proj_weight.shape[1]
    dtype = compute_dtype(X, proj_weight)
    return n, C, K, max(16, triton.next_power_of_2(K)), dtype


@torch.library.custom_op("kromhc_vision::stream_pre_fwd", mutates_args=())
def _stream_pre_fwd(X: torch.Tensor, norm_weight: torch.Tensor, proj_weight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n, C, K, KP, dtype = _dims(X, proj_weight)
    X = X.contiguous()
    T = X.numel() // (n * C)
    u = X.new_empty(*X.shape[:-2], C)
    coef = X.new_empty(*X.shape[:-2], K, dtype=dtype)
    with on_device(X):
        _stream_pre_fwd_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)](
            X, norm_weight.contiguous(), proj_weight.contiguous(), scale.contiguous(), bias.contiguous(), u, coef,
            T, eps, n=n, C=C, K=K, KP=KP, CD=tl_dtype(dtype), PREC=dot_precision(dtype))
    return u, coef


@_stream_pre_fwd.register_fake
def _(X, norm_weight, proj_weight, scale, bias, eps):
    n, C, K, _, dtype = _dims(X, proj_weight)
    return X.new_empty(*X.shape[:-2], C), X.new_empty(*X.shape[:-2], K, dtype=dtype)


@torch.library.custom_op("kromhc_vision::stream_pre_bwd", mutates_args=())
def _stream_pre_bwd(X: torch.Tensor, norm_weight: torch.Tensor, proj_weight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor, eps: float, du: torch.Tensor, dcoef: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, C, K, KP, dtype = _dims(X, proj_weight)
    X = X.contiguous()
    T, D = X.numel() // (n * C), n * C
    g, W = norm_weight.contiguous(), proj_weight.contiguous()
    dX = torch.empty_like(X)
    dr = X.new_empty(T, KP, dtype=dtype)
    part = X.new_zeros(triton.cdiv(T, MIN_BLOCK_T), 2, KP, dtype=dtype)
    cd, prec = tl_dtype(dtype), dot_precision(dtype)
    split = max(1, min(triton.cdiv(T, 64), num_programs_hint(X.device) // triton.cdiv(D, 64)))
    gpart = X.new_empty(split, D, KP, dtype=dtype)
    with on_device(X):
        _stream_pre_bwd_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)](
            X, g, W, scale.contiguous(), bias.contiguous(), du.contiguous(), dcoef.contiguous(), dX, dr, part, T,
            eps, n=n, C=C, K=K, KP=KP, CD=cd, PREC=prec)
        _stream_pre_dw_kernel[lambda meta: (triton.cdiv(D, meta["BLOCK_D"]), split)](
            X, dr, gpart, T, D=D, KP=KP, CD=cd, PREC=prec)
    grad_w = gpart.sum(0)[:, :K]
    return (dX, (grad_w * W.to(dtype)).sum(1).to(g.dtype), (grad_w * g.to(dtype)[:, None]).to(W.dtype),
            part[:, 1, :K].sum(0).to(scale.dtype), part[:, 0, :K].sum(0).to(bias.dtype))


@_stream_pre_bwd.register_fake
def _(X, norm_weight, proj_weight, scale, bias, eps, du, dcoef):
    # contiguous, as the op's outputs are (made from contiguous copies), whatever the inputs' strides
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (X, norm_weight, proj_weight, scale, bias))


def _setup_context(ctx, inputs, output):
    X, norm_weight, proj_weight, scale, bias, eps = inputs
    ctx.save_for_backward(X, norm_weight, proj_weight, scale, bias)
    ctx.eps = eps


def _backward(ctx, du, dcoef):
    X, norm_weight, proj_weight, scale, bias = ctx.saved_tensors
    n, C, K, _, dtype = _dims(X, proj_weight)
    if du is None:
        du = X.new_zeros(*X.shape[:-2], C)
    if dcoef is None:
        dcoef = X.new_zeros(*X.shape[:-2], K, dtype=dtype)
    return *_stream_pre_bwd(X, norm_weight, proj_weight, scale, bias, ctx.eps, du, dcoef), None


_stream_pre_fwd.register_autograd(_backward, setup_context=_setup_context)


def stream_pre(X, norm_weight, proj_weight, scale, bias, eps: float):
    """``X (..., n, C)`` -> ``u (..., C)``, ``h_pre (..., n)``, ``h_post (..., n)``, ``a_res (..., m)``, ``X``.

    Same signature and values as :func:`kromhc_vision.ops.reference.stream_pre`.
    """
    check_stream_pre_shapes(X, norm_weight, proj_weight, scale, bias)
    n = X.shape[-2]
    u, coef = _stream_pre_fwd(X, norm_weight, proj_weight, scale, bias, eps)
    return u, coef[..., :n], coef[..., n:2 * n], coef[..., 2 * n:], X
