"""``stream_pre`` on CPU: the whole pre step, projection included, in one pass over the stream state each way.

Per token, with ``x`` the stream state ``(n, C)`` read as a row of ``nC`` values, ``W_g = g * W`` the gained
projection ``(nC, k)`` and ``k = 2n + m``::

    forward:   r = x W_g,   rho = (|x|^2 / nC + eps)^-1/2,   a = b + s * r * rho,
               H_pre = sigmoid(a[:n]),  H_post = 2 sigmoid(a[n:2n]),  a_res = a[2n:],  u = H_pre x
    backward:  dH_pre += <du, x_j>,   da = [dH_pre H_pre (1 - H_pre) | dH_post H_post (1 - H_post / 2) | da_res]
               dr = s * da * rho,   coef = -rho^3 / (nC) * sum_k s_k da_k r_k
               dx = dX_post + coef * x + H_pre^T du + dr W_g^T   (+ H_res^T dZ, the post step's dX, when linked)
               dW_g = sum_t x_t^T dr_t,   dg = sum_k dW_g W,   dW = dW_g g,
               ds = sum_t da r rho,   db = sum_t da

Tokens go in blocks of four, so each row of ``W_g^T`` (``nC`` values, in L1/L2) is read once per four tokens
for the dot products ``r`` forward (four rows of ``W_g^T`` per pass over the block's ``x``: 16 sums in registers),
once per four for the four rows of ``dr W_g^T`` (four rows of ``W_g^T`` per pass over them) backward
(BENCHMARKS.md ``bench_models_xeon_blocked``); the block's ``x`` stays in L1 meanwhile. The partial sums of
``dW_g`` (``k x nC``, in L2) take two blocks' ``x`` per pass: one read and write per eight tokens (BENCHMARKS.md
``xeon_link_dw8``; a BLAS ``dr^T x`` was slower), four of its rows per pass (BENCHMARKS.md ``dw_rows4``; ``k`` is
padded to a multiple of four for it: with a loop bound of ``k - k % 4`` the vectorised loop was compiled but not
run, its runtime overlap check of the four rows, hoisted out of the coefficient loop, failing). The tokens are
split into one chunk per thread, each accumulating its own ``dW_g``, ``ds``, ``db``, summed at the end in a fixed
order (the values depend on the thread count, not on scheduling). A block's sigmoids are one vectorised loop of
:func:`~._exp.exp_nonpositive` of ``-|a|`` (libm's ``expf``, a scalar call per coefficient, took 15 % of the
forward; BENCHMARKS.md ``pre_sigmoids``), and the backward's per-token coefficient loop has no branches. What
each thread runs is a C function (:func:`_forward_body`, :mod:`._launch`) that a small parallel kernel, the same for
every stream count, calls by address: compiled and optimised once, where a ``prange`` loop with these bodies took
numba three times as long to compile (BENCHMARKS.md ``compile_time``). BLAS would run the three projections as
three more passes over the state (``T x nC`` floats each) and PyTorch the small reductions as a dozen more ops
(:mod:`kromhc_vision.ops.pytorch.stream_pre`, which this replaces on CPU; BENCHMARKS.md ``stream_pre_fused``).

Reference: :func:`kromhc_vision.ops.reference.stream_pre`.
"""
import functools
import math

import numba
import numpy as np
import torch

from .._custom_ops import call, custom_op, needs_grad, traced
from ..pytorch._once import once_differentiable
from ..reference import autocast_off, check_stream_pre_shapes, compute_dtype
from ._common import (KERNEL_SCALARS, LINK_ATTRIBUTE, PostGradLink, as_dtype, kernel_tensor, match_torch_threads,
                      prefer_vector_width, sized_kernel_tensor, token_array, vector_width)
from ._launch import BODY_SIGNATURE, float_from_bits, run_on_threads
from ._exp import exp_nonpositive
from ._prefetch import prefetch_part

_FLAGS = dict(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
TOKEN_BLOCK = 4  # tokens per block of the projection loops (the loops below spell out four)


@numba.njit(cache=True, error_model="numpy")
def gained_transposed(g, W):
    """``W_g^T = (g * W)^T`` as ``(k, nC)``: rows contiguous along the state."""
    NC, k = W.shape
    wt = np.empty((k, NC), W.dtype)
    for i in range(k):
        for c in range(NC):
            wt[i, c] = g[c] * W[c, i]
    return wt


@numba.njit(inline="always")
def dots4(zero, v, a, b, c, d):
    """``(<v, a>, <v, b>, <v, c>, <v, d>)`` over ``v``'s length, summed from ``zero`` (its type the sums'), in one
    pass over ``v``: four sums in registers."""
    s0 = zero
    s1 = zero
    s2 = zero
    s3 = zero
    for i in range(v.shape[0]):
        w = v[i]
        s0 += a[i] * w
        s1 += b[i] * w
        s2 += c[i] * w
        s3 += d[i] * w
    return s0, s1, s2, s3


# The bodies' int64 arguments (:mod:`._launch`), by position
FORWARD_ARGS = ("T", "C", "k", "blocks_per_thread", "eps_bits", "x", "g", "W", "scale", "bias", "u", "h_pre", "h_post",
                "a_res", "raw", "inv_rms")
BACKWARD_ARGS = ("T", "C", "k", "post_tokens", "mix_tokens", "du_tokens", "dh_pre_tokens", "per", "kp", "chunks", "x",
                 "dx", "dX_post", "dZ", "H", "du", "dh_pre", "dh_post", "da_res", "raw", "h_pre", "h_post", "inv_rms",
                 "g", "W", "scale", "dwt_parts", "sb_parts")
REDUCE_ARGS = ("NC", "k", "kp", "chunks", "columns_per_thread", "dwt_parts", "sb_parts", "W", "g", "dW", "dg",
               "dscale", "dbias")


@functools.lru_cache(maxsize=None)
def _forward_body(num_streams: int, width: int, dtype):
    """The forward's per-thread body for ``num_streams`` streams, vector width ``width``
    (:func:`~._common.vector_width`) and float dtype ``dtype`` (``np.float32`` or ``np.float64``): a ``cfunc`` of
    :data:`~._launch.BODY_SIGNATURE` (:mod:`._launch`), its arguments named by :data:`FORWARD_ARGS`. ``N`` is a
    compile-time constant, so the loops over streams unroll and ``u`` is summed in registers. Compiled when first
    made (each direction when first run), or loaded from numba's disk cache.

    ``N``, ``WIDTH`` and ``DT`` must stay the closures' only free variables: numba's disk cache keys a closure by
    the pickled contents of its cells, and a dispatcher in a cell pickles differently in every process (the cache
    never hit, and each process compiled these again; ``tests/ops/test_numba_cache.py``)."""
    N, WIDTH, DT = num_streams, width, dtype

    @numba.cfunc(BODY_SIGNATURE, **_FLAGS)
    def forward(p, a):
        """Thread ``p``'s run of token blocks: blocks ``p * per .. (p + 1) * per`` of ``T`` tokens of ``N`` streams
        of width ``C``, ``k`` coefficients; each thread forms its own ``W_g^T``."""
        prefer_vector_width(WIDTH)
        like = DT(0)
        T, C, k, per, eps = a[0], a[1], a[2], a[3], float_from_bits(a[4])
        NC = N * C
        x, g, W = token_array(a[5], like, (T, N, C)), token_array(a[6], like, (NC,)), token_array(a[7], like, (NC, k))
        scale, bias = token_array(a[8], like, (k,)), token_array(a[9], like, (k,))
        u, h_pre = token_array(a[10], like, (T, C)), token_array(a[11], like, (T, N))
        h_post = token_array(a[12], like, (T, N))
        a_res, raw = token_array(a[13], like, (T, k - 2 * N)), token_array(a[14], like, (T, k))
        inv_rms = token_array(a[15], like, (T, 1))
        dt = x.dtype.type  # every value in x's dtype, as the reference
        xf = x.reshape((T, NC))
        wt = gained_transposed(g, W)
        blocks = (T + TOKEN_BLOCK - 1) // TOKEN_BLOCK
        gate = np.empty(TOKEN_BLOCK * 2 * N, np.float64)  # a block's sigmoids
        for b in range(min(p * per, blocks), min((p + 1) * per, blocks)):
            t0 = b * TOKEN_BLOCK
            if t0 + TOKEN_BLOCK <= T:  # rows as 1-d views, four coefficients per pass: 16 sums in registers
                x0, x1, x2, x3 = xf[t0], xf[t0 + 1], xf[t0 + 2], xf[t0 + 3]
                k4 = k - k % 4
                # the next block (this thread's next: prange's chunks are contiguous), a part per group
                ahead, groups = t0 + TOKEN_BLOCK, k4 // 4
                rows = min(TOKEN_BLOCK, T - ahead)
                for i in range(0, k4, 4):
                    prefetch_part(xf, ahead * NC, rows * NC, i // 4, groups)
                    wa, wb, wc, wd = wt[i], wt[i + 1], wt[i + 2], wt[i + 3]
                    a0 = dt(0)
                    a1 = dt(0)
                    a2 = dt(0)
                    a3 = dt(0)
                    b0 = dt(0)
                    b1 = dt(0)
                    b2 = dt(0)
                    b3 = dt(0)
                    c0 = dt(0)
                    c1 = dt(0)
                    c2 = dt(0)
                    c3 = dt(0)
                    d0 = dt(0)
                    d1 = dt(0)
                    d2 = dt(0)
                    d3 = dt(0)
                    for c in range(NC):
                        ga, gb, gc, gd = wa[c], wb[c], wc[c], wd[c]
                        v0, v1, v2, v3 = x0[c], x1[c], x2[c], x3[c]
                        a0 += v0 * ga
                        a1 += v1 * ga
                        a2 += v2 * ga
                        a3 += v3 * ga
                        b0 += v0 * gb
                        b1 += v1 * gb
                        b2 += v2 * gb
                        b3 += v3 * gb
                        c0 += v0 * gc
                        c1 += v1 * gc
                        c2 += v2 * gc
                        c3 += v3 * gc
                        d0 += v0 * gd
                        d1 += v1 * gd
                        d2 += v2 * gd
                        d3 += v3 * gd
                    raw[t0, i], raw[t0 + 1, i], raw[t0 + 2, i], raw[t0 + 3, i] = a0, a1, a2, a3
                    raw[t0, i + 1], raw[t0 + 1, i + 1], raw[t0 + 2, i + 1], raw[t0 + 3, i + 1] = b0, b1, b2, b3
                    raw[t0, i + 2], raw[t0 + 1, i + 2], raw[t0 + 2, i + 2], raw[t0 + 3, i + 2] = c0, c1, c2, c3
                    raw[t0, i + 3], raw[t0 + 1, i + 3], raw[t0 + 2, i + 3], raw[t0 + 3, i + 3] = d0, d1, d2, d3
                for i in range(k4, k):
                    raw[t0, i], raw[t0 + 1, i], raw[t0 + 2, i], raw[t0 + 3, i] = dots4(dt(0), wt[i], x0, x1, x2, x3)
            else:
                for t in range(t0, T):
                    for i in range(k):
                        r = dt(0)
                        for c in range(NC):
                            r += xf[t, c] * wt[i, c]
                        raw[t, i] = r
            t1 = min(t0 + TOKEN_BLOCK, T)
            for t in range(t0, t1):
                xt, rt = xf[t], raw[t]
                s = dt(0)
                for c in range(NC):
                    s += xt[c] * xt[c]
                rho = dt(1.0 / math.sqrt(s / NC + eps))
                inv_rms[t, 0] = rho
                for i in range(2 * N):
                    gate[(t - t0) * 2 * N + i] = bias[i] + scale[i] * (rt[i] * rho)
                ar = a_res[t]
                for i in range(2 * N, k):
                    ar[i - 2 * N] = bias[i] + scale[i] * (rt[i] * rho)
            # the block's sigmoids in one loop LLVM vectorises: exp(-|a|) <= 1 as arithmetic, not libm calls
            for j in range((t1 - t0) * 2 * N):
                a = gate[j]
                e = exp_nonpositive(-abs(a))
                gate[j] = (1.0 if a >= 0 else e) / (1.0 + e)
            for t in range(t0, t1):
                hp, hq, ut = h_pre[t], h_post[t], u[t]
                for i in range(N):
                    hp[i] = gate[(t - t0) * 2 * N + i]
                    hq[i] = 2.0 * gate[(t - t0) * 2 * N + N + i]
                if N == 4:  # every coefficient a scalar: one vectorised pass
                    p0, p1, p2, p3 = hp[0], hp[1], hp[2], hp[3]
                    s0, s1, s2, s3 = x[t, 0], x[t, 1], x[t, 2], x[t, 3]
                    for c in range(C):
                        ut[c] = p0 * s0[c] + p1 * s1[c] + p2 * s2[c] + p3 * s3[c]
                else:
                    p0, s0 = hp[0], x[t, 0]
                    for c in range(C):
                        ut[c] = p0 * s0[c]
                    for j in range(1, N):
                        pj, sj = hp[j], x[t, j]
                        for c in range(C):
                            ut[c] += pj * sj[c]
        return 1

    return forward


@functools.lru_cache(maxsize=None)
def _backward_body(num_streams: int, width: int, dtype):
    """The backward's per-thread body (as :func:`_forward_body`; arguments :data:`BACKWARD_ARGS`)."""
    N, WIDTH, DT = num_streams, width, dtype

    @numba.cfunc(BODY_SIGNATURE, **_FLAGS)
    def backward(p, a):
        """Thread ``p``'s chunk of ``per`` tokens: their ``dx``, and the chunk's partial sums ``dwt_parts[p]``
        (``dW_g^T``) and ``sb_parts[p]`` (``ds``, ``db``), which :func:`_reduce_body` sums. ``dX_post`` of 0 tokens
        (``post_tokens``) stands for none (a zero gradient), ``du`` and ``dh_pre`` of 0 tokens likewise, and ``dZ``,
        ``H`` (the post step's ``dX_next`` and ``H_res``) of 0 tokens (``mix_tokens``) for no ``H_res^T dZ`` term.
        Each thread forms its own ``W_g^T``, as the forward's."""
        prefer_vector_width(WIDTH)
        like = DT(0)
        T, C, k, post_tokens, mix_tokens, du_tokens, dh_pre_tokens, per, kp, chunks = (
            a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9])
        NC = N * C
        x, dx = token_array(a[10], like, (T, N, C)), token_array(a[11], like, (T, N, C))
        dX_post, dZ = token_array(a[12], like, (post_tokens, N, C)), token_array(a[13], like, (mix_tokens, N, C))
        H, du = token_array(a[14], like, (mix_tokens, N, N)), token_array(a[15], like, (du_tokens, C))
        dh_pre, dh_post = token_array(a[16], like, (dh_pre_tokens, N)), token_array(a[17], like, (T, N))
        da_res, raw = token_array(a[18], like, (T, k - 2 * N)), token_array(a[19], like, (T, k))
        h_pre, h_post = token_array(a[20], like, (T, N)), token_array(a[21], like, (T, N))
        inv_rms, g = token_array(a[22], like, (T, 1)), token_array(a[23], like, (NC,))
        W, scale = token_array(a[24], like, (NC, k)), token_array(a[25], like, (k,))
        dwt_parts, sb_parts = token_array(a[26], like, (chunks, kp, NC)), token_array(a[27], like, (chunks, 2, k))
        dt = x.dtype.type  # a float64 coef would widen the loops over C
        xf = x.reshape((T, NC))
        dxf = dx.reshape((T, NC))
        wt = gained_transposed(g, W)
        has_post, has_mix, has_du = dX_post.shape[0] != 0, dZ.shape[0] != 0, du.shape[0] != 0
        has_dh_pre = dh_pre.shape[0] != 0
        acc = dwt_parts[p]
        acc[:, :] = 0.0
        sb = sb_parts[p]
        sb[:, :] = 0.0
        sb0, sb1 = sb[0], sb[1]
        da = np.empty(k, x.dtype)  # a token's gradients of the coefficients a
        dr = np.zeros((2 * TOKEN_BLOCK, kp), x.dtype)  # dr of two blocks: dW_g takes a pair of blocks a pass
        pending = False  # the previous block's dW_g term is not added yet (its dr in rows 0-3)
        hi = min(T, (p + 1) * per)
        for t0 in range(p * per, hi, TOKEN_BLOCK):
            nt = min(TOKEN_BLOCK, hi - t0)
            r0 = TOKEN_BLOCK if pending else 0  # this block's first row of dr
            for q in range(nt):
                t = t0 + q
                rho = inv_rms[t, 0]
                for i in range(N):  # da of H_pre: dH_pre = dh_pre + <du, x_i>
                    da[i] = dh_pre[t, i] if has_dh_pre else dt(0)
                if has_du:
                    ut = du[t]
                    if N == 4:  # the four dot products in one pass over du
                        s0, s1, s2, s3 = dots4(dt(0), ut, x[t, 0], x[t, 1], x[t, 2], x[t, 3])
                        da[0] += s0
                        da[1] += s1
                        da[2] += s2
                        da[3] += s3
                    else:
                        for i in range(N):
                            xi = x[t, i]
                            s = dt(0)
                            for c in range(C):
                                s += ut[c] * xi[c]
                            da[i] += s
                for i in range(N):
                    h = h_pre[t, i]
                    da[i] = da[i] * h * (dt(1) - h)
                    h = h_post[t, i]
                    da[N + i] = dh_post[t, i] * h * (dt(1) - dt(0.5) * h)
                for i in range(2 * N, k):
                    da[i] = da_res[t, i - 2 * N]
                rt, drq = raw[t], dr[r0 + q]
                qs = dt(0)
                for i in range(k):  # no branches: vectorised
                    d = da[i]
                    sb0[i] += d * rt[i] * rho
                    sb1[i] += d
                    d = d * scale[i]
                    drq[i] = d * rho
                    qs += d * rt[i]
                coef = dt(-qs * rho * rho * rho / NC)
                if has_mix and has_du and not has_post:  # the linked post step's case: one pass over dx
                    ut = du[t]
                    if N == 4:  # 1-d row views, every coefficient a scalar: one vectorised pass per row
                        z0, z1, z2, z3 = dZ[t, 0], dZ[t, 1], dZ[t, 2], dZ[t, 3]
                        for j in range(N):
                            hj, d, xj = h_pre[t, j], dx[t, j], x[t, j]
                            a0, a1, a2, a3 = H[t, 0, j], H[t, 1, j], H[t, 2, j], H[t, 3, j]
                            for c in range(C):
                                d[c] = (coef * xj[c] + hj * ut[c]
                                        + a0 * z0[c] + a1 * z1[c] + a2 * z2[c] + a3 * z3[c])
                    else:
                        for j in range(N):  # rows as 1-d views, each coefficient a scalar
                            h = h_pre[t, j]
                            d, xj = dx[t, j], x[t, j]
                            for c in range(C):
                                d[c] = coef * xj[c] + h * ut[c]
                            for i in range(N):
                                hij, z = H[t, i, j], dZ[t, i]
                                for c in range(C):
                                    d[c] += hij * z[c]
                    continue
                for j in range(N):
                    if has_post:
                        for c in range(C):
                            dx[t, j, c] = dX_post[t, j, c] + coef * x[t, j, c]
                    else:
                        for c in range(C):
                            dx[t, j, c] = coef * x[t, j, c]
                    if has_mix:  # the post step's dX = H_res^T dZ, formed here instead of written there
                        for c in range(C):
                            v = dx[t, j, c]
                            for i in range(N):
                                v += H[t, i, j] * dZ[t, i, c]
                            dx[t, j, c] = v
                    if has_du:
                        h = h_pre[t, j]
                        for c in range(C):
                            dx[t, j, c] += h * du[t, c]
            if nt == TOKEN_BLOCK:  # rows as 1-d views: LLVM vectorises these loops better than 2-d indexing
                x0, x1, x2, x3 = xf[t0], xf[t0 + 1], xf[t0 + 2], xf[t0 + 3]
                y0, y1, y2, y3 = dxf[t0], dxf[t0 + 1], dxf[t0 + 2], dxf[t0 + 3]
                # dx: four rows of W_g^T per pass over the block's four dx rows (a quarter of the stores of
                # one); dW_g: its own loop below, over two blocks' x, four of its rows a pass
                k4 = k - k % 4
                ahead, groups = t0 + TOKEN_BLOCK, k4 // 4  # the next block's inputs, a part per group
                rows = min(TOKEN_BLOCK, hi - ahead)
                for i in range(0, k4, 4):
                    prefetch_part(xf, ahead * NC, rows * NC, i // 4, groups)
                    if has_mix:
                        prefetch_part(dZ, ahead * NC, rows * NC, i // 4, groups)
                    if has_post:
                        prefetch_part(dX_post, ahead * NC, rows * NC, i // 4, groups)
                    if has_du:
                        prefetch_part(du, ahead * C, rows * C, i // 4, groups)
                    a0, b0, c0, e0 = dr[r0, i], dr[r0, i + 1], dr[r0, i + 2], dr[r0, i + 3]
                    a1, b1, c1, e1 = dr[r0 + 1, i], dr[r0 + 1, i + 1], dr[r0 + 1, i + 2], dr[r0 + 1, i + 3]
                    a2, b2, c2, e2 = dr[r0 + 2, i], dr[r0 + 2, i + 1], dr[r0 + 2, i + 2], dr[r0 + 2, i + 3]
                    a3, b3, c3, e3 = dr[r0 + 3, i], dr[r0 + 3, i + 1], dr[r0 + 3, i + 2], dr[r0 + 3, i + 3]
                    wa, wb, wc, wd = wt[i], wt[i + 1], wt[i + 2], wt[i + 3]
                    for c in range(NC):
                        ga, gb, gc, gd = wa[c], wb[c], wc[c], wd[c]
                        y0[c] += a0 * ga + b0 * gb + c0 * gc + e0 * gd
                        y1[c] += a1 * ga + b1 * gb + c1 * gc + e1 * gd
                        y2[c] += a2 * ga + b2 * gb + c2 * gc + e2 * gd
                        y3[c] += a3 * ga + b3 * gb + c3 * gc + e3 * gd
                for i in range(k4, k):
                    d0 = dr[r0, i]
                    d1 = dr[r0 + 1, i]
                    d2 = dr[r0 + 2, i]
                    d3 = dr[r0 + 3, i]
                    w = wt[i]
                    for c in range(NC):
                        wi = w[c]
                        y0[c] += d0 * wi
                        y1[c] += d1 * wi
                        y2[c] += d2 * wi
                        y3[c] += d3 * wi
                if pending:  # dW_g: four coefficients x eight tokens a pass over their rows of the partial sums
                    w0, w1, w2, w3 = xf[t0 - 4], xf[t0 - 3], xf[t0 - 2], xf[t0 - 1]
                    for i in range(0, acc.shape[0], 4):  # kp, not k - k % 4: see the docstring
                        a, b, e, f = acc[i], acc[i + 1], acc[i + 2], acc[i + 3]
                        a0, a1, a2, a3, a4, a5, a6, a7 = (dr[0, i], dr[1, i], dr[2, i], dr[3, i],
                                                          dr[4, i], dr[5, i], dr[6, i], dr[7, i])
                        b0, b1, b2, b3, b4, b5, b6, b7 = (dr[0, i + 1], dr[1, i + 1], dr[2, i + 1], dr[3, i + 1],
                                                          dr[4, i + 1], dr[5, i + 1], dr[6, i + 1], dr[7, i + 1])
                        e0, e1, e2, e3, e4, e5, e6, e7 = (dr[0, i + 2], dr[1, i + 2], dr[2, i + 2], dr[3, i + 2],
                                                          dr[4, i + 2], dr[5, i + 2], dr[6, i + 2], dr[7, i + 2])
                        f0, f1, f2, f3, f4, f5, f6, f7 = (dr[0, i + 3], dr[1, i + 3], dr[2, i + 3], dr[3, i + 3],
                                                          dr[4, i + 3], dr[5, i + 3], dr[6, i + 3], dr[7, i + 3])
                        for c in range(NC):
                            v0, v1, v2, v3, v4, v5, v6, v7 = w0[c], w1[c], w2[c], w3[c], x0[c], x1[c], x2[c], x3[c]
                            a[c] += (a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3 + a4 * v4 + a5 * v5 + a6 * v6 + a7 * v7)
                            b[c] += (b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3 + b4 * v4 + b5 * v5 + b6 * v6 + b7 * v7)
                            e[c] += (e0 * v0 + e1 * v1 + e2 * v2 + e3 * v3 + e4 * v4 + e5 * v5 + e6 * v6 + e7 * v7)
                            f[c] += (f0 * v0 + f1 * v1 + f2 * v2 + f3 * v3 + f4 * v4 + f5 * v5 + f6 * v6 + f7 * v7)
                    pending = False
                elif t0 + 2 * TOKEN_BLOCK <= hi:  # a whole block follows: add this one's with it
                    pending = True
                else:
                    for i in range(k):
                        d0 = dr[0, i]
                        d1 = dr[1, i]
                        d2 = dr[2, i]
                        d3 = dr[3, i]
                        a = acc[i]
                        for c in range(NC):
                            a[c] += d0 * x0[c] + d1 * x1[c] + d2 * x2[c] + d3 * x3[c]
            else:
                for q in range(nt):  # not after a pending block: that needs a whole block to follow
                    t = t0 + q
                    for i in range(k):
                        d = dr[q, i]
                        for c in range(NC):
                            dxf[t, c] += d * wt[i, c]
                            acc[i, c] += d * xf[t, c]
        return 1

    return backward


@functools.lru_cache(maxsize=None)
def _reduce_body(width: int, dtype):
    """The backward's last step, per thread (any stream count; see :func:`_forward_body`, arguments
    :data:`REDUCE_ARGS`): the chunks' partial sums, added in chunk order (the values depend on the thread count,
    not on scheduling), ``dW = dW_g g`` and ``dg = sum_k dW_g W`` for thread ``p``'s columns of ``dW``, and
    ``ds``, ``db`` on thread 0."""
    WIDTH, DT = width, dtype

    @numba.cfunc(BODY_SIGNATURE, **_FLAGS)
    def reduce(p, a):
        prefer_vector_width(WIDTH)
        like = DT(0)
        NC, k, kp, chunks, per = a[0], a[1], a[2], a[3], a[4]
        dwt_parts, sb_parts = token_array(a[5], like, (chunks, kp, NC)), token_array(a[6], like, (chunks, 2, k))
        W, g = token_array(a[7], like, (NC, k)), token_array(a[8], like, (NC,))
        dW, dg = token_array(a[9], like, (NC, k)), token_array(a[10], like, (NC,))
        dscale, dbias = token_array(a[11], like, (k,)), token_array(a[12], like, (k,))
        dt = W.dtype.type
        if p == 0:
            for i in range(k):
                s0 = dt(0)
                s1 = dt(0)
                for q in range(chunks):
                    s0 += sb_parts[q, 0, i]
                    s1 += sb_parts[q, 1, i]
                dscale[i] = s0
                dbias[i] = s1
        for c in range(min(p * per, NC), min((p + 1) * per, NC)):
            sg = dt(0)
            for i in range(k):
                s = dt(0)
                for q in range(chunks):
                    s += dwt_parts[q, i, c]
                sg += s * W[c, i]
                dW[c, i] = s * g[c]
            dg[c] = sg
        return 1

    return reduce


@numba.njit(parallel=True, cache=True)
def _forward_launcher(body, threads, px, pg, pW, pscale, pbias, eps, pu, ph_pre, ph_post, pa_res, praw, pinv_rms, T, C,
                      k):
    """Run the forward body at address ``body`` (:func:`_forward_body`) on ``threads`` threads, each on a
    contiguous run of token blocks, with its arguments (:data:`FORWARD_ARGS`). For any stream count: compiled
    once."""
    blocks = (T + TOKEN_BLOCK - 1) // TOKEN_BLOCK
    eps_bits = np.empty(1, np.float64)
    eps_bits[0] = eps
    a = np.empty(len(FORWARD_ARGS), np.int64)
    a[0], a[1], a[2], a[3], a[4] = T, C, k, (blocks + threads - 1) // threads, eps_bits.view(np.int64)[0]
    a[5], a[6], a[7], a[8], a[9], a[10] = px, pg, pW, pscale, pbias, pu
    a[11], a[12], a[13], a[14], a[15] = ph_pre, ph_post, pa_res, praw, pinv_rms
    run_on_threads(body, threads, a.ctypes.data)
    return a[0]  # a used after the loop: alive until the bodies have returned


@numba.njit(parallel=True, cache=True)
def _backward_launcher(body, reduce, chunks, px, pdX_post, post_tokens, pdZ, mix_tokens, pH, pdu, du_tokens, pdh_pre,
                       dh_pre_tokens, pdh_post, pda_res, ph_pre, ph_post, praw, pinv_rms, pg, pW, pscale, pdx, pdg, pdW,
                       pdscale, pdbias, T, C, k, n, like):
    """Run the backward body at address ``body`` on ``chunks`` threads (one chunk of tokens each; arguments
    :data:`BACKWARD_ARGS`), then ``reduce`` (:func:`_reduce_body`, :data:`REDUCE_ARGS`) on as many, over the
    chunks' partial sums of ``dW_g^T`` and ``ds``, ``db`` (``kp`` rows: ``k`` padded to whole groups of four
    coefficients, the extra ones unused), made here. For any stream count ``n``: compiled once per dtype."""
    NC, kp = n * C, (k + 3) // 4 * 4
    dtype = np.asarray(like).dtype  # like's, for np.empty (a scalar has no dtype attribute in numba)
    dwt_parts = np.empty((chunks, kp, NC), dtype)
    sb_parts = np.empty((chunks, 2, k), dtype)
    a = np.empty(len(BACKWARD_ARGS), np.int64)
    a[0], a[1], a[2], a[3], a[4], a[5], a[6] = T, C, k, post_tokens, mix_tokens, du_tokens, dh_pre_tokens
    a[7] = ((T + chunks - 1) // chunks + TOKEN_BLOCK - 1) // TOKEN_BLOCK * TOKEN_BLOCK  # tokens per chunk
    a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15] = kp, chunks, px, pdx, pdX_post, pdZ, pH, pdu
    a[16], a[17], a[18], a[19], a[20], a[21], a[22] = pdh_pre, pdh_post, pda_res, praw, ph_pre, ph_post, pinv_rms
    a[23], a[24], a[25], a[26], a[27] = pg, pW, pscale, dwt_parts.ctypes.data, sb_parts.ctypes.data
    r = np.empty(len(REDUCE_ARGS), np.int64)
    r[0], r[1], r[2], r[3], r[4], r[5], r[6] = NC, k, kp, chunks, (NC + chunks - 1) // chunks, a[26], a[27]
    r[7], r[8], r[9], r[10], r[11], r[12] = pW, pg, pdW, pdg, pdscale, pdbias
    run_on_threads(body, chunks, a.ctypes.data)
    run_on_threads(reduce, chunks, r.ctypes.data)
    # used after the loops: alive until the bodies have returned
    return a[0] + r[0] + dwt_parts.shape[0] + sb_parts.shape[0]


@functools.lru_cache(maxsize=None)
def _kernels(num_streams: int):
    """The forward and backward kernels for ``num_streams`` streams at the vector width in force when first asked
    for (:func:`~._common.vector_width`): the launchers with this stream count's bodies (:func:`_forward_body`,
    :func:`_backward_body`), the tensors at their addresses ``p*`` (:func:`~._common.token_array`), in the dtype of
    ``like``."""
    N, WIDTH = num_streams, vector_width()

    def forward(px, pg, pW, pscale, pbias, eps, pu, ph_pre, ph_post, pa_res, praw, pinv_rms, T, C, k, threads,
                like):
        """``T`` tokens of ``N`` streams of width ``C``, ``k`` coefficients; ``threads``: one contiguous run of
        token blocks each."""
        _forward_launcher(_forward_body(N, WIDTH, type(like)).address, threads, px, pg, pW, pscale, pbias, eps, pu,
                          ph_pre, ph_post, pa_res, praw, pinv_rms, T, C, k)

    def backward(px, pdX_post, post_tokens, pdZ, mix_tokens, pH, pdu, du_tokens, pdh_pre, dh_pre_tokens, pdh_post,
                 pda_res, ph_pre, ph_post, praw, pinv_rms, pg, pW, pscale, pdx, pdg, pdW, pdscale, pdbias, T, C, k,
                 chunks, like):
        """As :func:`forward`; ``chunks``: the threads (one chunk of tokens each)."""
        _backward_launcher(_backward_body(N, WIDTH, type(like)).address, _reduce_body(WIDTH, type(like)).address,
                           chunks, px, pdX_post, post_tokens, pdZ, mix_tokens, pH, pdu, du_tokens, pdh_pre,
                           dh_pre_tokens, pdh_post, pda_res, ph_pre, ph_post, praw, pinv_rms, pg, pW, pscale, pdx, pdg,
                           pdW, pdscale, pdbias, T, C, k, N, like)

    return forward, backward


def _forward_outputs(X, proj_weight, bias):
    """``u, h_pre, h_post, a_res, raw, inv_rms``: ``X``'s leading dimensions, in the compute dtype."""
    n, C = X.shape[-2:]
    lead, k, dtype = X.shape[:-2], bias.shape[0], compute_dtype(X, proj_weight)
    return tuple(X.new_empty((*lead, width), dtype=dtype) for width in (C, n, n, k - 2 * n, k, 1))


def _parameters(op, X, k, dtype, *params):
    """``norm_weight (n C)``, ``proj_weight (n C, k)``, ``scale (k)`` [, ``bias (k)``] in ``dtype``, C-contiguous,
    each one's size checked (the kernels read them by address)."""
    n, C = X.shape[-2:]
    if k < 2 * n:
        raise ValueError(f"{op}: {k} coefficients for {n} streams; it takes at least 2n = {2 * n}")
    return [sized_kernel_tensor(op, name, t, size, dtype)
            for name, t, size in zip(("norm_weight", "proj_weight", "scale", "bias"), params, (n * C, n * C * k, k, k))]


@custom_op("kromhc_vision::cpu_stream_pre_fwd", device_types="cpu")
def _stream_pre_fwd(X: torch.Tensor, norm_weight: torch.Tensor, proj_weight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``X (..., n, C)`` -> ``u (..., C), h_pre, h_post (..., n), a_res (..., m), raw (..., k), inv_rms (..., 1)``."""
    n, C = X.shape[-2:]
    k = bias.shape[0]
    dtype = compute_dtype(X, proj_weight)  # _forward_outputs' dtype
    params = _parameters("stream_pre", X, k, dtype, norm_weight, proj_weight, scale, bias)  # checked first
    x = kernel_tensor(X, dtype)
    outs = _forward_outputs(X, proj_weight, bias)
    threads = match_torch_threads()
    _kernels(n)[0](x.data_ptr(), *(p.data_ptr() for p in params), eps, *(o.data_ptr() for o in outs),
                   X.numel() // (n * C), C, k, threads, KERNEL_SCALARS[dtype])
    return outs


_stream_pre_fwd.register_fake(lambda X, norm_weight, proj_weight, scale, bias, eps:
                              _forward_outputs(X, proj_weight, bias))


def _backward_outputs(X, norm_weight, proj_weight, scale, raw):
    dtype = raw.dtype
    return (X.new_empty(X.shape, dtype=dtype), *(X.new_empty(p.shape, dtype=dtype)
                                                 for p in (norm_weight, proj_weight, scale, scale)))


@custom_op("kromhc_vision::cpu_stream_pre_bwd", device_types="cpu")
def _stream_pre_bwd(X: torch.Tensor, dX_post: torch.Tensor, dZ: torch.Tensor, h_res: torch.Tensor, du: torch.Tensor,
                    dh_pre: torch.Tensor, dh_post: torch.Tensor, da_res: torch.Tensor, h_pre: torch.Tensor,
                    h_post: torch.Tensor, raw: torch.Tensor, inv_rms: torch.Tensor, norm_weight: torch.Tensor,
                    proj_weight: torch.Tensor, scale: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``dX`` (in the compute dtype, ``X``'s shape), ``dg, dW, dscale, dbias``. The gradients are of ``X``'s
    leading dimensions, or of 0 tokens for none (``dX_post``, ``du``, ``dh_pre``); ``dZ (..., n, C)`` and
    ``h_res (..., n, n)`` add ``H_res^T dZ`` to ``dX`` (the post step's gradient of ``X``, not formed there; 0 tokens:
    none)."""
    n, C = X.shape[-2:]
    T, k = X.numel() // (n * C), raw.shape[-1]
    dtype = raw.dtype  # the compute dtype: the forward's
    params = _parameters("cpu_stream_pre_bwd", X, k, dtype, norm_weight, proj_weight, scale)
    tokens = {}  # each one's: T, or 0 for the gradients that may be none
    for name, t, width in (("dX_post", dX_post, n * C), ("dZ", dZ, n * C), ("h_res", h_res, n * n), ("du", du, C),
                           ("dh_pre", dh_pre, n), ("dh_post", dh_post, n), ("da_res", da_res, k - 2 * n),
                           ("h_pre", h_pre, n), ("h_post", h_post, n), ("raw", raw, k), ("inv_rms", inv_rms, 1)):
        tokens[name] = t.numel() // width if width else T  # a_res of no logits (m = 0): T tokens of none
        if t.numel() != tokens[name] * width:
            raise ValueError(f"cpu_stream_pre_bwd: {name} of shape {tuple(t.shape)} is not tokens of {width} values")
        optional = name in ("dX_post", "dZ", "h_res", "du", "dh_pre")  # the kernel reads T tokens of each or none
        if tokens[name] not in ((0, T) if optional else (T,)) or (name == "h_res" and tokens[name] != tokens["dZ"]):
            raise ValueError(f"cpu_stream_pre_bwd: {name} has {tokens[name]} tokens; it takes X's {T}"
                             + (" or 0 (none)" if optional else "") + (", as many as dZ" if name == "h_res" else ""))
    tensors = [kernel_tensor(t, dtype) for t in (X, dX_post, dZ, h_res, du, dh_pre, dh_post, da_res, h_pre, h_post,
                                                 raw, inv_rms)]
    outs = _backward_outputs(X, norm_weight, proj_weight, scale, raw)
    x, dX_post, dZ, h_res, du, dh_pre, *rest = (t.data_ptr() for t in tensors)
    threads = match_torch_threads()
    _kernels(n)[1](x, dX_post, tokens["dX_post"], dZ, tokens["dZ"], h_res, du, tokens["du"], dh_pre, tokens["dh_pre"],
                   *rest, *(p.data_ptr() for p in params), *(o.data_ptr() for o in outs), T, C, k, threads,
                   KERNEL_SCALARS[dtype])
    return outs


_stream_pre_bwd.register_fake(lambda X, dX_post, dZ, h_res, du, dh_pre, dh_post, da_res, h_pre, h_post, raw, inv_rms,
                              norm_weight, proj_weight, scale: _backward_outputs(X, norm_weight, proj_weight, scale,
                                                                                 raw))


def _forward(X, norm_weight, proj_weight, scale, bias, eps):
    """The forward op: ``u`` in ``X``'s dtype, the rest in the compute dtype."""
    with autocast_off(X.device):
        u, h_pre, h_post, a_res, raw, inv_rms = call(_stream_pre_fwd, X, norm_weight, proj_weight, scale, bias, eps)
    return as_dtype(u, X.dtype), h_pre, h_post, a_res, raw, inv_rms


class StreamPre(torch.autograd.Function):
    """``stream_pre`` with the kernels above, in the compute dtype (the ops read any leading dimensions as tokens).

    A fifth output is ``X`` itself, for the post step: the gradient the post step sends to ``X`` then arrives
    here as ``dX_post`` and is added in the kernel's one pass that forms ``dx``, instead of autograd summing
    the two ``dX`` in a separate pass over the stream state. With a ``link`` (eager mode), the numba post step
    puts ``(dZ, H_res)`` there instead of forming ``dX_post = H_res^T dZ``, and this backward adds that term in
    the same pass (:class:`~kromhc_vision.ops.numba._common.PostGradLink`).
    """

    @staticmethod
    def forward(ctx, X, norm_weight, proj_weight, scale, bias, eps, link=None):
        ctx.set_materialize_grads(False)
        u, h_pre, h_post, a_res, raw, inv_rms = _forward(X, norm_weight, proj_weight, scale, bias, eps)
        ctx.save_for_backward(X, norm_weight, proj_weight, scale, raw, inv_rms, h_pre, h_post)
        ctx.link, ctx.bias_dtype = link, bias.dtype
        return u, h_pre, h_post, a_res, X

    @staticmethod
    @once_differentiable('stream_pre')  # double backward raises DoubleBackwardUnsupportedError
    def backward(ctx, du, dh_pre, dh_post, da_res, dX_post):
        X, norm_weight, proj_weight, scale, raw, inv_rms, h_pre, h_post = ctx.saved_tensors
        n, C = X.shape[-2:]
        k = raw.shape[-1]

        def grad(g, width, none_tokens=None):
            """``g``, or zeros for none; 0 tokens where the kernel reads that as none"""
            if g is not None:
                return g
            return raw.new_zeros(0, width) if none_tokens == 0 else raw.new_zeros(*raw.shape[:-1], width)

        mix = None if ctx.link is None else ctx.link.take()
        dZ, h_res = mix if mix is not None else (raw.new_zeros(0, n * C), raw.new_zeros(0, n * n))
        dx, dg, dW, dscale, dbias = call(
            _stream_pre_bwd, X, grad(dX_post, n * C, 0), dZ, h_res, grad(du, C, 0), grad(dh_pre, n, 0),
            grad(dh_post, n), grad(da_res, k - 2 * n), h_pre, h_post, raw, inv_rms, norm_weight, proj_weight, scale)
        return (as_dtype(dx, X.dtype), as_dtype(dg, norm_weight.dtype), as_dtype(dW, proj_weight.dtype),
                as_dtype(dscale, scale.dtype), as_dtype(dbias, ctx.bias_dtype), None, None)


def stream_pre(X, norm_weight, proj_weight, scale, bias, eps: float):
    """``u, h_pre, h_post, a_res`` as :func:`kromhc_vision.ops.reference.stream_pre`, then ``X`` (an alias of it
    where autograd records the call).

    Same signature and values as the reference. Pass the last output (not ``X``) to the post step, so that its
    gradient joins ``dX`` inside :class:`StreamPre`'s backward (in eager mode the alias carries a
    :class:`~kromhc_vision.ops.numba._common.PostGradLink` for the numba post step). Where autograd records nothing
    (inference), the forward op alone, without the Function.
    """
    check_stream_pre_shapes(X, norm_weight, proj_weight, scale, bias)
    args = (X, norm_weight, proj_weight, scale, bias)
    if traced(args):
        return StreamPre.apply(X, norm_weight, proj_weight, scale, bias, eps)
    if not needs_grad(args):
        return (*_forward(X, norm_weight, proj_weight, scale, bias, eps)[:4], X)
    link = PostGradLink()
    outs = StreamPre.apply(X, norm_weight, proj_weight, scale, bias, eps, link)
    setattr(outs[4], LINK_ATTRIBUTE, link)
    return outs
