"""numba ``stream_pre`` (the whole pre step, projection GEMMs included) against
:func:`kromhc_vision.ops.reference.stream_pre` differentiated by autograd."""
import importlib

import pytest
import torch

from kromhc_vision.ops.reference import stream_pre as stream_pre_reference

# the module (the package's ``stream_pre`` attribute is the op)
numba_pre = importlib.import_module("kromhc_vision.ops.numba.stream_pre")
EPS = 1e-6


# (lead, n, C, m): token counts on both sides of the blocks of four and of the per-thread chunks, one token,
# none, a wide coefficient row (KromHC n = 8 has m = 6; mHC-lite n = 4 has 24; 80 is beyond both), n = 8, and
# every remainder of k = 2n + m after the kernels' blocks of four coefficients (k = 6, 12, 12, 12, 80, 22, 2, 7, 5)
SHAPES = [((1,), 2, 3, 2), ((7,), 3, 5, 6), ((2, 13), 4, 24, 4), ((0,), 4, 8, 4), ((3, 4), 4, 4, 72),
          ((37,), 8, 16, 6), ((5,), 1, 7, 0), ((11,), 3, 5, 1), ((9,), 2, 6, 1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lead, n, C, m", SHAPES)
def test_matches_reference(lead, n, C, m, dtype, compare, stream_pre_inputs):
    compare(numba_pre.stream_pre, stream_pre_reference, stream_pre_inputs(lead, n, C, m, dtype), (EPS,))


def test_gradcheck(stream_pre_inputs):
    assert torch.autograd.gradcheck(lambda *a: numba_pre.stream_pre(*a, EPS), stream_pre_inputs((2, 3), 3, 5, 6))


def grads_of(fn, inputs, used):
    """Gradients of a random combination of the outputs in ``used``; an input the loss misses counts as zeros."""
    outs = fn(*inputs, EPS)
    g = torch.Generator()
    loss = sum((outs[i] * torch.randn(outs[i].shape, generator=g.manual_seed(i), dtype=outs[i].dtype)).sum()
               for i in used)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [o.detach() for o in outs] + [torch.zeros_like(x) if d is None else d for x, d in zip(inputs, grads)]


@pytest.mark.parametrize("used", [(0,), (1,), (2,), (3,), (4,), (0, 4), (1, 2, 3), (2, 3, 4)])
def test_any_subset_of_outputs(used, stream_pre_inputs):
    """Outputs that do not reach the loss get no gradient (None) and must count as zero, whichever they are
    (the fifth, the alias of ``X``, carries the post step's gradient into the kernel as ``dX_post``)."""
    inputs = stream_pre_inputs((6,), 3, 5, 6)
    for a, b in zip(grads_of(numba_pre.stream_pre, inputs, used), grads_of(stream_pre_reference, inputs, used)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_every_output_entry_is_written(monkeypatch, stream_pre_inputs):
    """Outputs allocated full of NaN: the kernels must write every entry of every output."""
    for name in ("_forward_outputs", "_backward_outputs"):
        allocate = getattr(numba_pre, name)
        monkeypatch.setattr(numba_pre, name, lambda *a, f=allocate: tuple(t.fill_(float("nan")) for t in f(*a)))
    inputs = stream_pre_inputs((13,), 3, 5, 6)
    every = (0, 1, 2, 3, 4)
    for a, b in zip(grads_of(numba_pre.stream_pre, inputs, every), grads_of(stream_pre_reference, inputs, every)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_thread_count(threads, monkeypatch, stream_pre_inputs):
    """Each thread sums its own chunk of tokens into partial ``dW``, ``ds``, ``db``: every split (chunks of
    unequal length, a chunk shorter than a block) gives the reference's gradients."""
    monkeypatch.setattr(numba_pre, "match_torch_threads", lambda: threads)
    inputs = stream_pre_inputs((21,), 4, 6, 4)
    for a, b in zip(grads_of(numba_pre.stream_pre, inputs, (0, 1, 3, 4)),
                    grads_of(stream_pre_reference, inputs, (0, 1, 3, 4))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_takes_a_strided_stream_state(stream_pre_inputs):
    """``X`` sliced out of a wider tensor (not viewable as ``(T, n*C)`` rows): same values and gradients."""
    _, *params = stream_pre_inputs((2, 3), 3, 5, 4)
    wide = torch.randn(2, 3, 3, 9, dtype=torch.float64, requires_grad=True)
    every = (0, 1, 2, 3, 4)
    ours = grads_of(lambda w, *p: numba_pre.stream_pre(w[..., 2:7], *p), [wide, *params], every)
    ref = grads_of(lambda w, *p: stream_pre_reference(w[..., 2:7], *p), [wide, *params], every)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bf16_streams_keep_dtype_and_fp32_coefficients(stream_pre_inputs):
    """bf16 streams ``X (3, 5, 4, 16)``, fp32 parameters: ``u`` comes back bf16, the coefficients fp32, all equal to
    the reference's (fp32 sums, one rounding to each output's dtype) to that rounding: bf16 to one step (rtol
    2^-7), fp32 to 1e-5; so are the gradients wrt ``X`` (bf16) and the parameters (fp32)."""
    X, *params = stream_pre_inputs((3, 5), 4, 16, 4, torch.float32)
    Xb = X.detach().bfloat16().requires_grad_()
    leaves = [Xb, *params]

    def run(op):
        outs = op(Xb, *params, EPS)[:4]
        loss = sum((t.float() * torch.randn(t.shape, generator=torch.Generator().manual_seed(i))).sum()
                   for i, t in enumerate(outs))
        return outs, torch.autograd.grad(loss, leaves)

    (u, h_pre, h_post, a_res), grads = run(numba_pre.stream_pre)
    ref, ref_grads = run(stream_pre_reference)
    assert u.dtype == torch.bfloat16 and h_pre.dtype == h_post.dtype == a_res.dtype == torch.float32
    assert [t.dtype for t in grads] == [torch.bfloat16] + [torch.float32] * 4
    for name, a, e in zip(("u", "h_pre", "h_post", "a_res", "dX", "dg", "dW", "ds", "db"),
                          (u, h_pre, h_post, a_res, *grads), (*ref, *ref_grads)):
        rtol, atol = (2 ** -7, 1e-6) if a.dtype == torch.bfloat16 else (1e-5, 1e-5)
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_extreme_inputs_stay_finite(stream_pre_inputs):
    """Saturated sigmoids (logits far beyond +-100) give exactly 0, 1 or 2, not NaN, and finite gradients."""
    X, g, W, s, b = stream_pre_inputs((9,), 4, 16, 8, torch.float32)
    b = torch.where(torch.arange(b.shape[0]) % 2 == 0, 1e4, -1e4).requires_grad_()
    outs = numba_pre.stream_pre(X, g, W, s, b, EPS)
    assert all(t.isfinite().all() for t in outs)
    assert set(outs[1].unique().tolist()) <= {0.0, 1.0} and set(outs[2].unique().tolist()) <= {0.0, 2.0}
    grads = torch.autograd.grad(sum(o.sum() for o in outs[:4]), (X, g, W, s, b))
    assert all(d.isfinite().all() for d in grads)


def test_sigmoids_round_the_exact_value(stream_pre_inputs):
    """The forward's sigmoids (arithmetic ``exp(-|a|)``, not libm's ``expf``) are the float64 sigmoid of the float32
    logit rounded to float32, to an ulp, for logits from -90 to 90 (zero scale: the logits are the bias)."""
    X, g, W, s, _ = stream_pre_inputs((6,), 8, 4, 2, torch.float32)
    s = torch.zeros_like(s)
    for logits in torch.linspace(-90.0, 90.0, 16 * 40).split(16):
        b = torch.cat([logits, torch.zeros(2)])
        _, h_pre, h_post, _, _ = numba_pre.stream_pre(X, g, W, s, b, EPS)
        exact = torch.sigmoid(logits.double())
        torch.testing.assert_close(h_pre, exact[:8].float().expand_as(h_pre), rtol=1.2e-7, atol=1e-45)
        torch.testing.assert_close(h_post, (2 * exact[8:]).float().expand_as(h_post), rtol=1.2e-7, atol=1e-45)


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_opcheck(lead, stream_pre_inputs):
    """The ops read any leading dimensions as tokens; their fakes give the real outputs' shapes and dtypes."""
    x, g, W, s, b = (t.detach() for t in stream_pre_inputs(lead, 3, 8, 6))
    torch.library.opcheck(torch.ops.kromhc_vision.cpu_stream_pre_fwd.default, (x, g, W, s, b, EPS))
    u, h_pre, h_post, a_res, raw, inv_rms = torch.ops.kromhc_vision.cpu_stream_pre_fwd(x, g, W, s, b, EPS)
    n, C = x.shape[-2:]
    mix = (torch.randn_like(x), torch.randn(*lead, n, n, dtype=x.dtype))  # the post step's dZ, H_res
    no_mix = (x.new_zeros(0, n, C), x.new_zeros(0, n, n))
    grads = (torch.randn_like(x), torch.randn(*lead, C, dtype=x.dtype), torch.randn_like(h_pre),
             torch.randn_like(h_post), torch.randn_like(a_res))
    for dZ_h_res in (mix, no_mix):
        torch.library.opcheck(torch.ops.kromhc_vision.cpu_stream_pre_bwd.default,
                              (x, grads[0], *dZ_h_res, *grads[1:], h_pre, h_post, raw, inv_rms, g, W, s))
    no_post_no_u = (x.new_zeros(0, n, C), *mix, x.new_zeros(0, C), *grads[2:])
    torch.library.opcheck(torch.ops.kromhc_vision.cpu_stream_pre_bwd.default,
                          (x, *no_post_no_u, h_pre, h_post, raw, inv_rms, g, W, s))
    no_dh_pre = (*no_post_no_u[:4], x.new_zeros(0, n), *grads[3:])
    torch.library.opcheck(torch.ops.kromhc_vision.cpu_stream_pre_bwd.default,
                          (x, *no_dh_pre, h_pre, h_post, raw, inv_rms, g, W, s))


def test_backward_reads_gradients_of_no_tokens_as_zero(stream_pre_inputs):
    """``dX_post``, ``du`` and ``dh_pre`` of 0 tokens (what StreamPre's backward passes for None) give what zeros give,
    bitwise; a token count other than X's or 0 is refused before the kernel, which would read past it."""
    x, g, W, s, b = (t.detach() for t in stream_pre_inputs((7,), 4, 5, 4))
    u, h_pre, h_post, a_res, raw, inv_rms = torch.ops.kromhc_vision.cpu_stream_pre_fwd(x, g, W, s, b, EPS)
    n, C = x.shape[-2:]
    mix = (torch.randn_like(x), torch.randn(7, n, n, dtype=x.dtype))
    dh_post, da_res = torch.randn_like(h_post), torch.randn_like(a_res)
    bwd = torch.ops.kromhc_vision.cpu_stream_pre_bwd

    def run(dX_post, du, dh_pre, dZ_h_res=mix):
        return bwd(x, dX_post, *dZ_h_res, du, dh_pre, dh_post, da_res, h_pre, h_post, raw, inv_rms, g, W, s)

    zeros = run(torch.zeros_like(x), x.new_zeros(7, C), x.new_zeros(7, n))
    for a, z in zip(run(x.new_zeros(0, n, C), x.new_zeros(0, C), x.new_zeros(0, n)), zeros):
        torch.testing.assert_close(a, z, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dh_pre has 6 tokens; it takes X's 7 or 0"):
        run(torch.zeros_like(x), x.new_zeros(7, C), x.new_zeros(6, n))
    with pytest.raises(ValueError, match="h_res has 0 tokens; it takes X's 7 or 0 \\(none\\), as many as dZ"):
        run(torch.zeros_like(x), x.new_zeros(7, C), x.new_zeros(7, n), (mix[0], x.new_zeros(0, n, n)))


@pytest.mark.parametrize("span, parts, line", [(3072, 8, 16), (3072, 3, 16), (100, 8, 16), (5, 8, 16), (0, 4, 16),
                                               (777, 6, 8)])
def test_prefetch_parts_cover_the_next_block_once(span, parts, line):
    """The pre kernels prefetch the next token block a part per coefficient group: the parts are consecutive,
    whole cache lines but the last, together cover the block's elements exactly once, and none is larger than
    an equal share rounded up to whole lines (the prefetches are spread over the groups, not issued at once)."""
    from kromhc_vision.ops.numba._prefetch import part_bounds

    bounds = [part_bounds(span, p, parts, line) for p in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == span
    assert all(hi == nxt for (_, hi), (nxt, _) in zip(bounds, bounds[1:]))
    assert all(lo <= hi and (lo % line == 0 or lo == hi == span) for lo, hi in bounds)  # empty parts at the end
    share = -(-span // parts)
    assert max(hi - lo for lo, hi in bounds) <= -(-share // line) * line
