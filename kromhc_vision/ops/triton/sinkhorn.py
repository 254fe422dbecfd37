"""Log-domain Sinkhorn-Knopp for mHC, batched over tokens: ``(..., n, n) -> (..., n, n)``, n <= 16.

Each of ``T`` iterations normalises rows then columns, ``L <- L - lse_row(L)``,
``L <- L - lse_col(L)``, and ``P = exp(L_T)``. A step ``L' = L - lse(L)`` has the exact adjoint
``dL = dL' - exp(L') * sum(dL')`` (sum along the normalised axis), so the backward needs only
each step's output. It recomputes them from the logits instead of storing them: iteration ``t``
is recomputed in ``t + 1`` iterations, ``O(T^2)`` work on ``n^2`` values per token, no extra
memory. Reference: :func:`kromhc_vision.ops.reference.sinkhorn` (differentiated by autograd).
"""
import torch
import triton
import triton.language as tl

from ..dispatch import TRITON_SINKHORN_MAX_STREAMS as MAX_N
from ._common import autotune, configs, nbytes, on_device, prune_by_resources


_CONFIGS = configs([(dict(), 1), (dict(), 2), (dict(), 4)], dict())


def _sinkhorn_resources(a, num_warps, num_stages):
    """Registers: ``BLOCK_T * NP^2`` logits (about 1024) live as ``L``, ``dL`` and two recomputed iterates."""
    return 0, 4 * a["BLOCK_T"] * a["NP"] ** 2 * (nbytes(a["LOGITS"].dtype) // 4) / (32 * num_warps)


_PRUNE = prune_by_resources(_sinkhorn_resources)


@triton.jit
def _normalize(L, valid, padding, AXIS: tl.constexpr):
    """``L - logsumexp(L, AXIS)`` on the valid entries, ``-inf`` on the padding. A row (column) of valid entries
    is normalised as ``torch.log_softmax`` does it, NaN where it holds a NaN or +inf or is all -inf; only the rows
    (columns) of padding alone (``padding (BLOCK_T, NP)``: a token past ``T`` or an index past ``n``, the same for
    rows and columns) take a placeholder ``logsumexp`` of 0."""
    m = tl.where(padding, 0, tl.max(L, AXIS))
    s = tl.sum(tl.exp(L - tl.expand_dims(m, AXIS)), AXIS)
    lse = m + tl.log(tl.where(padding, 1, s))
    return tl.where(valid, L - tl.expand_dims(lse, AXIS), float("-inf"))


@triton.jit
def _iterate(L, valid, padding, num_iters):
    for _ in range(num_iters):
        L = _normalize(L, valid, padding, 2)
        L = _normalize(L, valid, padding, 1)
    return L


@triton.jit
def _block(T, n: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, NP)
    offs = rows.to(tl.int64)[:, None, None] * (n * n) + i[None, :, None] * n + i[None, None, :]
    valid = (rows[:, None, None] < T) & (i[None, :, None] < n) & (i[None, None, :] < n)
    padding = (rows[:, None] >= T) | (i[None, :] >= n)
    return offs, valid, padding


@autotune(_CONFIGS, key=["n"], prune_configs_by=_PRUNE)
@triton.jit
def _sinkhorn_fwd_kernel(LOGITS, OUT, T, num_iters, n: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr):
    offs, valid, padding = _block(T, n, NP, BLOCK_T)
    L = tl.load(LOGITS + offs, mask=valid, other=float("-inf"))
    tl.store(OUT + offs, tl.exp(_iterate(L, valid, padding, num_iters)), mask=valid)


@autotune(_CONFIGS, key=["n"], prune_configs_by=_PRUNE)
@triton.jit
def _sinkhorn_bwd_kernel(LOGITS, DOUT, DLOGITS, T, num_iters, n: tl.constexpr, NP: tl.constexpr,
                         BLOCK_T: tl.constexpr):
    offs, valid, padding = _block(T, n, NP, BLOCK_T)
    L0 = tl.load(LOGITS + offs, mask=valid, other=float("-inf"))
    dL = tl.load(DOUT + offs, mask=valid, other=0) * tl.exp(_iterate(L0, valid, padding, num_iters))
    for k in range(num_iters):
        rows = _normalize(_iterate(L0, valid, padding, num_iters - 1 - k), valid, padding, 2)
        cols = _normalize(rows, valid, padding, 1)
        dL -= tl.exp(cols) * tl.expand_dims(tl.sum(dL, 1), 1)
        dL -= tl.exp(rows) * tl.expand_dims(tl.sum(dL, 2), 2)
    tl.store(DLOGITS + offs, dL, mask=valid)


def _launch(kernel, logits, *tensors, num_iters):
    n = logits.shape[-1]
    NP = triton.next_power_of_2(n)
    T = logits.numel() // (n * n)
    block_t = max(1, 1024 // (NP * NP))
    with on_device(logits):
        kernel[(triton.cdiv(T, block_t),)](*tensors, T, num_iters, n=n, NP=NP, BLOCK_T=block_t)


def _check(logits):
    n = logits.shape[-1]
    if logits.shape[-2] != n or not 1 <= n <= MAX_N:
        raise ValueError(f"sinkhorn expects (..., n, n) logits with n <= {MAX_N}, got {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"sinkhorn runs in float32 or float64, got {logits.dtype}")


@torch.library.custom_op("kromhc_vision::sinkhorn_fwd", mutates_args=())
def _sinkhorn_fwd(logits: torch.Tensor, num_iters: int) -> torch.Tensor:
    logits = logits.contiguous()
    out = torch.empty_like(logits)
    _launch(_sinkhorn_fwd_kernel, logits, logits, out, num_iters=num_iters)
    return out


@_sinkhorn_fwd.register_fake
def _(logits, num_iters):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("kromhc_vision::sinkhorn_bwd", mutates_args=())
def _sinkhorn_bwd(logits: torch.Tensor, dout: torch.Tensor, num_iters: int) -> torch.Tensor:
    logits = logits.contiguous()
    dlogits = torch.empty_like(logits)
    _launch(_sinkhorn_bwd_kernel, logits, logits, dout.contiguous(), dlogits, num_iters=num_iters)
    return dlogits


@_sinkhorn_bwd.register_fake
def _(logits, dout, num_iters):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.num_iters = inputs[1]


def _backward(ctx, dout):
    return _sinkhorn_bwd(ctx.saved_tensors[0], dout, ctx.num_iters), None


_sinkhorn_fwd.register_autograd(_backward, setup_context=_setup_context)


def sinkhorn(logits: torch.Tensor, num_iters: int) -> torch.Tensor:
    """``(..., n, n)`` float32/float64 logits -> ``exp`` of ``num_iters`` row-then-column log normalisations.

    Same values as :func:`kromhc_vision.ops.reference.sinkhorn`; the gradient is that of the iterations.
    """
    _check(logits)
    return _sinkhorn_fwd(logits, num_iters)
