"""Fused ``stream_post``: the depth connection ``X_next = H_res X + H_post^T y`` in one pass.

Per token (``X (n, C)``, ``y (C)``, ``H_res (n, n)``, ``H_post (n)``), backward given ``dZ = dX_next``::

    dX = H_res^T dZ,   dy = H_post dZ,   dH_res[i, j] = <dZ_i, X_j>,   dH_post[i] = <dZ_i, y>

Both kernels read each stream block once and write each output once; accumulation is in the
coefficients' compute dtype. Reference: :func:`kromhc_vision.ops.reference.stream_post`.
"""
import torch
import triton
import triton.language as tl

from .._custom_ops import custom_op, register_stream_post
from ..reference import compute_dtype
from ._common import autotune, configs, nbytes, on_device, prune_by_resources, tl_dtype

_CONFIGS = configs(
    [(dict(BLOCK_T=4, BLOCK_C=256), 4), (dict(BLOCK_T=8, BLOCK_C=128), 4), (dict(BLOCK_T=16, BLOCK_C=128), 8),
     (dict(BLOCK_T=32, BLOCK_C=64), 4), (dict(BLOCK_T=8, BLOCK_C=256), 8), (dict(BLOCK_T=2, BLOCK_C=128), 4)],
    dict(BLOCK_T=4, BLOCK_C=32),
)


def _post_resources(backward: bool):
    """No dots, so little shared memory; registers: the ``(BLOCK_T, NP, BLOCK_C)`` accumulator (forward;
    about 1.5 of it live with the loaded ``h`` and ``x``) or the ``dZ`` tile with its products (backward, about
    3 of it), and one stream tile, in the compute dtype, over the threads (fitted to Triton 3.8's compiles)."""
    def estimate(a, num_warps, num_stages):
        cb = nbytes(a["CD"])
        tile = (3 if backward else 1.5) * a["BLOCK_T"] * a["NP"] * a["BLOCK_C"] + a["BLOCK_T"] * a["BLOCK_C"]
        return 1024, tile * (cb // 4) / (32 * num_warps)
    return prune_by_resources(estimate)




@autotune(_CONFIGS, key=["n", "C"], prune_configs_by=_post_resources(False))
@triton.jit
def _stream_post_fwd_kernel(X, Y, H, HP, OUT, T, n: tl.constexpr, C: tl.constexpr, NP: tl.constexpr,
                            CD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    rows = rows.to(tl.int64)
    si = tl.arange(0, NP)
    hm = row_mask[:, None] & (si[None, :] < n)
    hp = tl.load(HP + rows[:, None] * n + si[None, :], mask=hm, other=0).to(CD)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        m = row_mask[:, None] & (cc[None, :] < C)
        acc = tl.zeros((BLOCK_T, NP, BLOCK_C), CD)
        for j in range(n):
            h = tl.load(H + rows[:, None] * (n * n) + si[None, :] * n + j, mask=hm, other=0).to(CD)
            x = tl.load(X + rows[:, None] * (n * C) + j * C + cc[None, :], mask=m, other=0).to(CD)
            acc += h[:, :, None] * x[:, None, :]
        y = tl.load(Y + rows[:, None] * C + cc[None, :], mask=m, other=0).to(CD)
        acc += hp[:, :, None] * y[:, None, :]
        ptr = OUT + rows[:, None, None] * (n * C) + si[None, :, None] * C + cc[None, None, :]
        tl.store(ptr, acc.to(OUT.dtype.element_ty), mask=hm[:, :, None] & m[:, None, :])


@autotune(_CONFIGS, key=["n", "C"], prune_configs_by=_post_resources(True))
@triton.jit
def _stream_post_bwd_kernel(X, Y, H, HP, DZ, DX, DY, DH, DHP, T, n: tl.constexpr, C: tl.constexpr,
                            NP: tl.constexpr, CD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    rows = rows.to(tl.int64)
    si = tl.arange(0, NP)
    hm = row_mask[:, None] & (si[None, :] < n)
    hp = tl.load(HP + rows[:, None] * n + si[None, :], mask=hm, other=0).to(CD)
    dh = tl.zeros((BLOCK_T, NP, NP), CD)
    dhp = tl.zeros((BLOCK_T, NP), CD)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        m = row_mask[:, None] & (cc[None, :] < C)
        ptr = rows[:, None, None] * (n * C) + si[None, :, None] * C + cc[None, None, :]
        dz = tl.load(DZ + ptr, mask=hm[:, :, None] & m[:, None, :], other=0).to(CD)
        y = tl.load(Y + rows[:, None] * C + cc[None, :], mask=m, other=0).to(CD)
        tl.store(DY + rows[:, None] * C + cc[None, :], tl.sum(hp[:, :, None] * dz, 1).to(DY.dtype.element_ty), mask=m)
        dhp += tl.sum(dz * y[:, None, :], 2)
        for j in range(n):
            h = tl.load(H + rows[:, None] * (n * n) + si[None, :] * n + j, mask=hm, other=0).to(CD)
            x_ptr = rows[:, None] * (n * C) + j * C + cc[None, :]
            tl.store(DX + x_ptr, tl.sum(h[:, :, None] * dz, 1).to(DX.dtype.element_ty), mask=m)
            x = tl.load(X + x_ptr, mask=m, other=0).to(CD)
            dh += tl.where(si[None, None, :] == j, tl.sum(dz * x[:, None, :], 2)[:, :, None], 0)
    h_ptr = rows[:, None, None] * (n * n) + si[None, :, None] * n + si[None, None, :]
    tl.store(DH + h_ptr, dh.to(DH.dtype.element_ty), mask=hm[:, :, None] & (si[None, None, :] < n))
    tl.store(DHP + rows[:, None] * n + si[None, :], dhp.to(DHP.dtype.element_ty), mask=hm)


def _launch_args(X, h_res):
    n, C = X.shape[-2:]
    return dict(n=n, C=C, NP=triton.next_power_of_2(n), CD=tl_dtype(compute_dtype(X, h_res))), X.numel() // (n * C)


def _grid(T):
    return lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)


@custom_op("kromhc_vision::stream_post_fwd")
def _stream_post_fwd(X: torch.Tensor, y: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor) -> torch.Tensor:
    meta, T = _launch_args(X, h_res)
    X = X.contiguous()
    out = torch.empty_like(X)
    with on_device(X):
        _stream_post_fwd_kernel[_grid(T)](X, y.contiguous(), h_res.contiguous(), h_post.contiguous(), out, T, **meta)
    return out


@custom_op("kromhc_vision::stream_post_bwd")
def _stream_post_bwd(X: torch.Tensor, y: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor,
                     dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    meta, T = _launch_args(X, h_res)
    X, y, h_res, h_post = X.contiguous(), y.contiguous(), h_res.contiguous(), h_post.contiguous()
    grads = [torch.empty_like(t) for t in (X, y, h_res, h_post)]
    with on_device(X):
        _stream_post_bwd_kernel[_grid(T)](X, y, h_res, h_post, dout.contiguous(), *grads, T, **meta)
    return tuple(grads)


_stream_post = register_stream_post(_stream_post_fwd, _stream_post_bwd)


def stream_post(X, y, h_res, h_post):
    """``X (..., n, C)``, ``y (..., C)``, ``h_res (..., n, n)``, ``h_post (..., n)`` -> ``X_next (..., n, C)``.

    Same signature and values as :func:`kromhc_vision.ops.reference.stream_post`.
    """
    return _stream_post(X, y, h_res, h_post)
