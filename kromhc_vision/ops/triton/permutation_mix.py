"""mHC-lite's and KromHC's ``H_res`` on the GPU: a mixture of permutation matrices, one kernel per direction.

With factor sizes ``(i_1, ..., i_K)`` (mHC-lite: ``(n,)``) and per-token logits holding one chunk of ``i_k!``
logits per factor, the Kronecker product of the factors' Birkhoff mixes is the mixture over the
``R = prod_k i_k!`` combined permutations ``sigma_r`` (:func:`kromhc_vision.permutations.mixture_tables`)::

    lse_k = logsumexp(logits chunk k),   W_r = exp(sum_k (a_{r_k} - lse_k)),   H = W MIX
    backward:  G = (dH MIX^T) * W,   dlogits = G SEL - w * sum_r G_r,   w = exp(a - lse of the logit's chunk)

with ``MIX (R, n^2)`` the 0/1 matrix of ``H[i, sigma_r(i)] += W_r`` and ``SEL (R, m)`` that of the logits each
``r`` multiplies (``w_j dw_j = sum_{r uses j} G_r`` and ``sum_j w_j dw_j = sum_r G_r`` in every chunk). A
program takes ``BLOCK_T`` tokens; the products with ``MIX`` and ``SEL`` are ``tl.dot`` s over chunks of ``RB``
combined permutations. Everything is float64, each entry of ``H`` rounded once to the logits' dtype, as in the
numba kernel: rows and columns sum to 1 up to the rounding of their n entries (the reference rounds each factor and
forms their Kronecker product in the logits' dtype: float32 values agree to rounding). Half-precision logits are
taken in float32 (the compiler does not convert them to float64 for ``tl.dot``) and ``H`` rounded back. The backward
forms the weights again from the logits (what autograd keeps is the logits, which the connection keeps anyway).
NaN or ``+inf`` logits, or a chunk of ``-inf`` only, give NaN for the token, as the reference's softmax does.

Shapes beyond the kernels' tiles (more than ``MAX_LOGITS`` logits: mHC-lite at n = 6, 720 of them; or n above
``MAX_STREAMS``) run PyTorch's ops (:mod:`kromhc_vision.ops.pytorch.permutation_mix`), as every shape did before.
Reference: :func:`kromhc_vision.residual_maps.kronecker_birkhoff`.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from ...permutations import mixture_tables
from .. import pytorch
from ._common import autotune, configs, on_device, prune_by_resources

MAX_STREAMS = 16  # n^2 <= 256 entries of H per token in the tile
MAX_LOGITS = 128  # m: mHC-lite up to n = 5 (120), KromHC's factorisations up to n = 16
RB = tl.constexpr(16)  # combined permutations per tl.dot

_CONFIGS = configs([(dict(BLOCK_T=16), 4), (dict(BLOCK_T=32), 4), (dict(BLOCK_T=64), 8)], dict(BLOCK_T=16))


def _resources(a, num_warps, num_stages):
    """Registers: the float64 tiles of a program, ``BLOCK_T x`` (logits and their gradient, ``H`` or ``dH``, a
    few ``RB``-wide chunks) and the ``RB``-row chunks of ``MIX`` and ``SEL``, two 32-bit registers a value."""
    per_token = 2 * a["MP"] + a["N2P"] + 4 * RB.value
    tables = RB.value * (a["N2P"] + a["MP"])
    return 0, 2 * (a["BLOCK_T"] * per_token + tables) / (32 * num_warps)


_PRUNE = prune_by_resources(_resources)


@triton.jit
def _chunk_lse(a, cols, STARTS, NFAC: tl.constexpr, KP: tl.constexpr):
    """``(BLOCK_T, KP)``: column ``k`` the log-sum-exp of each token's chunk ``k`` of logits ``a (BLOCK_T, MP)``."""
    kcol = tl.arange(0, KP)
    lse = tl.zeros((a.shape[0], KP), tl.float64)
    for k in tl.static_range(NFAC):
        first = tl.load(STARTS + k)
        last = tl.load(STARTS + k + 1)
        inside = ((cols >= first) & (cols < last))[None, :]
        top = tl.max(tl.where(inside, a, float("-inf")), 1)
        total = tl.sum(tl.where(inside, tl.exp(a - top[:, None]), 0.0), 1)
        lse = tl.where(kcol[None, :] == k, (top + tl.log(total))[:, None], lse)
    return lse


@triton.jit
def _weights(LOGITS, IDX, rows, row_ok, r0, lse, m: tl.constexpr, R: tl.constexpr, NFAC: tl.constexpr,
             KP: tl.constexpr):
    """``(BLOCK_T, RB)``: ``W_r`` of the combined permutations ``r0 .. r0 + RB`` (0 past ``R``)."""
    r = r0 + tl.arange(0, RB)
    r_ok = r < R
    kcol = tl.arange(0, KP)
    log_w = tl.zeros((rows.shape[0], RB), tl.float64)
    for k in tl.static_range(NFAC):
        index = tl.load(IDX + r * NFAC + k, mask=r_ok, other=0)
        a = tl.load(LOGITS + rows[:, None] * m + index[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        lse_k = tl.sum(tl.where(kcol[None, :] == k, lse, 0.0), 1)
        log_w += a.to(tl.float64) - lse_k[:, None]
    return tl.where(r_ok[None, :], tl.exp(log_w), 0.0), r, r_ok


@triton.jit
def _logits_block(LOGITS, T, m: tl.constexpr, MP: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows = rows.to(tl.int64)
    cols = tl.arange(0, MP)
    a = tl.load(LOGITS + rows[:, None] * m + cols[None, :], mask=row_ok[:, None] & (cols < m)[None, :],
                other=0.0).to(tl.float64)  # padding: outside every chunk, masked by where it is read
    return rows, row_ok, cols, a


@autotune(_CONFIGS, key=["m", "R", "N2"], prune_configs_by=_PRUNE)
@triton.jit
def _permutation_mix_fwd_kernel(LOGITS, IDX, STARTS, MIX, OUT, T, m: tl.constexpr, R: tl.constexpr,
                                NFAC: tl.constexpr, KP: tl.constexpr, N2: tl.constexpr, MP: tl.constexpr,
                                N2P: tl.constexpr, BLOCK_T: tl.constexpr):
    rows, row_ok, cols, a = _logits_block(LOGITS, T, m, MP, BLOCK_T)
    lse = _chunk_lse(a, cols, STARTS, NFAC, KP)
    e = tl.arange(0, N2P)
    H = tl.zeros((BLOCK_T, N2P), tl.float64)
    for r0 in range(0, R, RB):
        W, r, r_ok = _weights(LOGITS, IDX, rows, row_ok, r0, lse, m, R, NFAC, KP)
        mix = tl.load(MIX + r[:, None] * N2P + e[None, :], mask=r_ok[:, None], other=0.0)
        H += tl.dot(W, mix, input_precision="ieee")
    tl.store(OUT + rows[:, None] * N2 + e[None, :], H.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & (e < N2)[None, :])


@autotune(_CONFIGS, key=["m", "R", "N2"], prune_configs_by=_PRUNE)
@triton.jit
def _permutation_mix_bwd_kernel(LOGITS, IDX, STARTS, MIX, SEL, DOUT, DLOGITS, T, m: tl.constexpr, R: tl.constexpr,
                                NFAC: tl.constexpr, KP: tl.constexpr, N2: tl.constexpr, MP: tl.constexpr,
                                N2P: tl.constexpr, BLOCK_T: tl.constexpr):
    rows, row_ok, cols, a = _logits_block(LOGITS, T, m, MP, BLOCK_T)
    lse = _chunk_lse(a, cols, STARTS, NFAC, KP)
    e = tl.arange(0, N2P)
    dH = tl.load(DOUT + rows[:, None] * N2 + e[None, :], mask=row_ok[:, None] & (e < N2)[None, :],
                 other=0.0).to(tl.float64)
    dA = tl.zeros((BLOCK_T, MP), tl.float64)
    total = tl.zeros((BLOCK_T,), tl.float64)
    for r0 in range(0, R, RB):
        W, r, r_ok = _weights(LOGITS, IDX, rows, row_ok, r0, lse, m, R, NFAC, KP)
        mix_t = tl.load(MIX + r[None, :] * N2P + e[:, None], mask=r_ok[None, :], other=0.0)
        G = tl.dot(dH, mix_t, input_precision="ieee") * W
        total += tl.sum(G, 1)
        sel = tl.load(SEL + r[:, None] * MP + cols[None, :], mask=r_ok[:, None], other=0.0)
        dA += tl.dot(G, sel, input_precision="ieee")
    # each logit's own chunk's log-sum-exp, from the chunk sizes' table
    kcol = tl.arange(0, KP)
    lse_of = tl.zeros((BLOCK_T, MP), tl.float64)
    for k in tl.static_range(NFAC):
        first = tl.load(STARTS + k)
        last = tl.load(STARTS + k + 1)
        lse_k = tl.sum(tl.where(kcol[None, :] == k, lse, 0.0), 1)
        lse_of = tl.where(((cols >= first) & (cols < last))[None, :], lse_k[:, None], lse_of)
    w = tl.exp(a - lse_of)
    tl.store(DLOGITS + rows[:, None] * m + cols[None, :], (dA - w * total[:, None]).to(DLOGITS.dtype.element_ty),
             mask=row_ok[:, None] & (cols < m)[None, :])


def padded_sizes(factors) -> dict:
    """The kernels' shape constexprs for ``factors``: ``m, R, NFAC, KP, N2, MP, N2P`` (tiles padded to powers of
    two, at least 16 where ``tl.dot`` takes them)."""
    m = sum(math.factorial(k) for k in factors)
    n = math.prod(factors)
    return dict(m=m, R=math.prod(math.factorial(k) for k in factors), NFAC=len(factors),
                KP=triton.next_power_of_2(len(factors)), N2=n * n, MP=max(16, triton.next_power_of_2(m)),
                N2P=max(16, triton.next_power_of_2(n * n)))


_TABLES = {}  # (factors, device) -> the kernels' tables on that device, made on first use


def _tables(factors: tuple, device: torch.device):
    """``IDX (R, K)`` int32, ``STARTS (K + 1)`` int32, ``MIX (R, N2P)`` and ``SEL (R, MP)`` float64 on ``device``,
    made on the first call for ``factors`` and ``device`` (copies from the host) and kept.

    That first call cannot happen inside a CUDA graph capture: a copy from pageable host memory is not capturable,
    and tensors made there would belong to the graph's private pool (as would those made in ``torch.compile``'s
    CUDA graph warm-up). The mHC-lite and KromHC connections therefore make them when built or moved to a device
    (:func:`prepare_permutation_mix`); a call from elsewhere should do the same before capturing."""
    key = (factors, device)
    tables = _TABLES.get(key)
    if tables is None:
        if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():  # no CUDA, no capture
            raise RuntimeError(
                f"the Triton permutation_mix kernels first ran for factors {factors} on {device} inside a CUDA "
                "graph capture, where their tables cannot be made (a copy from the host); run one step of the "
                "model eagerly before capturing it (a warm-up, which the autotuned kernels need as well)")
        tables = _TABLES[key] = _make_tables(factors, device)
    return tables


def _make_tables(factors: tuple, device: torch.device):
    columns, logit_index, starts = mixture_tables(factors)
    sizes = padded_sizes(factors)
    R, n = columns.shape
    entries = torch.arange(n) * n + torch.from_numpy(columns)  # (R, n): entry (i, sigma_r(i)) of H, flattened
    mix = torch.zeros(R, sizes["N2P"], dtype=torch.float64).scatter_(1, entries, 1.0)
    sel = torch.zeros(R, sizes["MP"], dtype=torch.float64).scatter_(1, torch.from_numpy(logit_index), 1.0)
    as_int = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    return as_int(logit_index.tolist()), as_int(starts.tolist()), mix.to(device), sel.to(device)


def prepare_permutation_mix(factors, device: torch.device) -> None:
    """Make the tables for ``factors`` on ``device`` now, where the kernels take ``factors`` (see
    :func:`kromhc_vision.ops.dispatch.prepare_permutation_mix`)."""
    if runs_kernel(factors):
        _tables(tuple(int(k) for k in factors), device)


def runs_kernel(factors) -> bool:
    """Whether the kernels take ``factors`` (else :func:`permutation_mix` runs PyTorch's ops)."""
    return math.prod(factors) <= MAX_STREAMS and sum(math.factorial(k) for k in factors) <= MAX_LOGITS


def _launch(kernel, factors, logits, *tensors):
    sizes = padded_sizes(factors)
    T = logits.numel() // sizes["m"]
    if T == 0:
        return  # no tokens: nothing to launch (the autotuner would time empty grids)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)  # noqa: E731
    with on_device(logits):  # the capture check in _tables looks at the current device's stream
        idx, starts, mix, sel = _tables(tuple(factors), logits.device)
        tables = (idx, starts, mix, sel) if kernel is _permutation_mix_bwd_kernel else (idx, starts, mix)
        kernel[grid](logits, *tables, *tensors, T, **sizes)


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or float64: what the kernels read and write (half precision is taken in float32)."""
    return dtype if dtype == torch.float64 else torch.float32


@torch.library.custom_op("kromhc_vision::permutation_mix_fwd", mutates_args=())
def _permutation_mix_fwd(logits: torch.Tensor, factors: list[int]) -> torch.Tensor:
    """``logits (..., m)`` -> ``H_res (..., n, n)`` in the logits' dtype."""
    n = math.prod(factors)
    a = logits.to(_kernel_dtype(logits.dtype)).contiguous()
    out = a.new_empty(*a.shape[:-1], n, n)
    _launch(_permutation_mix_fwd_kernel, factors, a, out)
    return out.to(logits.dtype)


@_permutation_mix_fwd.register_fake
def _(logits, factors):
    n = math.prod(factors)
    return logits.new_empty(*logits.shape[:-1], n, n)


@torch.library.custom_op("kromhc_vision::permutation_mix_bwd", mutates_args=())
def _permutation_mix_bwd(logits: torch.Tensor, factors: list[int], dout: torch.Tensor) -> torch.Tensor:
    """``logits``: the forward's input; ``dout``: the gradient of ``H_res`` -> the gradient of ``logits``."""
    dtype = _kernel_dtype(logits.dtype)
    a = logits.to(dtype).contiguous()
    dlogits = torch.empty_like(a)
    _launch(_permutation_mix_bwd_kernel, factors, a, dout.to(dtype).contiguous(), dlogits)
    return dlogits.to(logits.dtype)


@_permutation_mix_bwd.register_fake
def _(logits, factors, dout):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.factors = inputs[1]


def _backward(ctx, dout):
    return _permutation_mix_bwd(ctx.saved_tensors[0], ctx.factors, dout), None


_permutation_mix_fwd.register_autograd(_backward, setup_context=_setup_context)


def permutation_mix(logits: torch.Tensor, perms: list) -> torch.Tensor:
    """``(..., sum_k i_k!)`` logits -> ``(..., n, n)``: the Kronecker product of one Birkhoff mix per factor
    (one factor: mHC-lite). ``perms[k]`` is ``permutation_matrices(i_k)`` (only its size is read: the kernels
    number the permutations the same way). Same values as :func:`kromhc_vision.residual_maps.kronecker_birkhoff`;
    shapes the kernels do not take (:func:`runs_kernel`) run PyTorch's ops.
    """
    factors = [int(p.shape[-1]) for p in perms]
    m = sum(math.factorial(k) for k in factors)
    if logits.shape[-1] != m:
        raise ValueError(f"permutation_mix expects (..., {m}) logits for factors {tuple(factors)}, "
                         f"got {tuple(logits.shape)}")
    if not runs_kernel(factors):
        return pytorch.permutation_mix(logits, perms)
    return _permutation_mix_fwd(logits, factors)
