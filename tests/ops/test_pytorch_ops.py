"""The PyTorch backend's mixing steps against the autograd reference."""
import pytest
import torch

from kromhc_vision.ops.pytorch.stream_post import stream_post as stream_post_torch
from kromhc_vision.ops.pytorch.stream_pre import stream_pre as stream_pre_torch
from kromhc_vision.ops.reference import stream_post as stream_post_reference, stream_pre as stream_pre_reference


def post_inputs(n, C, lead=(2, 3), dtype=torch.float64):
    return [
        torch.randn(*lead, n, C, dtype=dtype, requires_grad=True),
        torch.randn(*lead, C, dtype=dtype, requires_grad=True),
        torch.randn(*lead, n, n, dtype=dtype, requires_grad=True),
        torch.randn(*lead, n, dtype=dtype, requires_grad=True),
    ]


def pre_reference_with_stream(X, *params):
    """The reference's five outputs (the fifth is ``X`` itself, as ``stream_pre_torch``'s is an alias of it)."""
    return stream_pre_reference(X, *params, 1e-6)


@pytest.mark.parametrize("n, C, m", [(2, 3, 2), (3, 5, 6), (4, 7, 4)])
def test_stream_pre_gradcheck(n, C, m, stream_pre_inputs):
    assert torch.autograd.gradcheck(lambda *a: stream_pre_torch(*a, 1e-6), stream_pre_inputs((2, 3), n, C, m))


@pytest.mark.parametrize("used", [(0,), (1,), (2,), (3,), (4,), (0, 4), (2, 3, 4)])
def test_stream_pre_gradient_of_any_subset_of_outputs(used, stream_pre_inputs):
    """Outputs that do not reach the loss get no gradient (None) and must count as zero, whichever they are."""
    inputs = stream_pre_inputs((2, 3), 3, 5, 6)

    def grads(fn):
        outs = fn(*inputs)
        g = torch.Generator()
        loss = sum((outs[i] * torch.randn(outs[i].shape, generator=g.manual_seed(i), dtype=outs[i].dtype)).sum()
                   for i in used)
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        return [torch.zeros_like(x) if d is None else d for x, d in zip(inputs, grads)]

    for a, b in zip(grads(lambda *a: stream_pre_torch(*a, 1e-6)), grads(pre_reference_with_stream)):
        torch.testing.assert_close(a, b)


def test_stream_pre_takes_a_strided_stream_state(stream_pre_inputs):
    """``X`` sliced out of a wider tensor (not viewable as ``(T, n*C)`` rows): same values and gradients."""
    _, *params = stream_pre_inputs((2, 3), 3, 5, 4)
    wide = torch.randn(2, 3, 3, 9, dtype=torch.float64, requires_grad=True)
    outs, grads = grads_of(lambda w, *p: stream_pre_torch(w[..., 2:7], *p, 1e-6), [wide, *params])
    ref_outs, ref_grads = grads_of(lambda w, *p: pre_reference_with_stream(w[..., 2:7], *p), [wide, *params])
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n, C", [(2, 3), (4, 7)])
def test_stream_post_gradcheck(n, C):
    assert torch.autograd.gradcheck(stream_post_torch, post_inputs(n, C))


def grads_of(fn, inputs, seed=1):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("lead", [(5,), (2, 3, 4)])
def test_stream_pre_matches_reference_float32(lead, stream_pre_inputs):
    inputs = stream_pre_inputs(lead, 4, 40, 4, torch.float32)
    outs, grads = grads_of(lambda *a: stream_pre_torch(*a, 1e-6), inputs)
    ref_outs, ref_grads = grads_of(pre_reference_with_stream, inputs)
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_stream_post_matches_reference_float32():
    inputs = post_inputs(6, 40, (3, 5), torch.float32)
    outs, grads = grads_of(stream_post_torch, inputs)
    ref_outs, ref_grads = grads_of(stream_post_reference, inputs)
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_streams_keep_dtype_and_fp32_coefficients(stream_pre_inputs):
    """bf16 streams ``X (3, 4, 16)``, fp32 parameters: ``u`` and ``X_next`` come back bf16 and the coefficients fp32;
    the outputs and the gradients wrt ``X``, ``y``, ``H_res (3, 4, 4)`` and the parameters are the reference's (fp32
    sums, one rounding to each tensor's dtype) to that rounding: bf16 to one step (rtol 2^-7), fp32 to 1e-5; ``dX``
    (two bf16 parts summed) to 1.6e-2. (A post step summing in bf16 is off by ~1e-2, which 1e-2 let pass.)"""
    X, g, W, s, b = stream_pre_inputs((3,), 4, 16, 4, torch.float32)
    Xb = X.detach().bfloat16().requires_grad_()
    y = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    h_res = torch.rand(3, 4, 4, requires_grad=True)
    leaves = [Xb, y, h_res, g, W, s, b]

    def run(pre, post):
        u, h_pre, h_post, a_res, state = pre(Xb, g, W, s, b, 1e-6)
        out = post(state, y, h_res, h_post)
        loss = sum((t.float() * torch.randn(t.shape, generator=torch.Generator().manual_seed(i))).sum()
                   for i, t in enumerate((u, h_pre, a_res, out)))
        return (u, h_pre, h_post, a_res, out), torch.autograd.grad(loss, leaves)

    (u, h_pre, h_post, a_res, out), grads = run(stream_pre_torch, stream_post_torch)
    (*ref, ref_out), ref_grads = run(stream_pre_reference, stream_post_reference)
    assert u.dtype == out.dtype == torch.bfloat16 and h_pre.dtype == h_post.dtype == a_res.dtype == torch.float32
    assert [t.dtype for t in grads] == [torch.bfloat16, torch.bfloat16] + [torch.float32] * 5
    for name, a, e in zip(("u", "h_pre", "h_post", "a_res", "X_next", "dX", "dy", "dH_res", "dg", "dW", "ds", "db"),
                          (u, h_pre, h_post, a_res, out, *grads), (*ref, ref_out, *ref_grads)):
        rtol, atol = (2 ** -7, 1e-6) if a.dtype == torch.bfloat16 else (1e-5, 1e-5)
        if name == "dX":  # the pre and post steps' parts, each rounded to bf16, summed in bf16 in another order
            rtol, atol = 1.6e-2, 1e-2
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("factors", [(2,), (3,), (4,), (2, 2), (2, 3)])
def test_permutation_mix_matches_reference_and_keeps_only_the_logits(factors, compare):
    """The PyTorch backend's permutation_mix against autograd on the reference (values, gradients, second
    gradients), keeping no float64 softmax weights for the backward (the reference keeps k! per token)."""
    import math
    from kromhc_vision.ops.pytorch import permutation_mix
    from kromhc_vision.permutations import permutation_matrices
    from kromhc_vision.residual_maps import kronecker_birkhoff
    perms = [permutation_matrices(k, dtype=torch.float64) for k in factors]
    m = sum(math.factorial(k) for k in factors)
    logits = (2 * torch.randn(3, 5, m, dtype=torch.float64)).requires_grad_()
    compare(permutation_mix, kronecker_birkhoff, [logits], (perms,))
    assert torch.autograd.gradcheck(lambda a: permutation_mix(a, perms), [logits])
    assert torch.autograd.gradgradcheck(lambda a: permutation_mix(a, perms), [logits])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        permutation_mix(logits.float().detach().requires_grad_(), [p.float() for p in perms])
    assert not any(t.dtype == torch.float64 for t in saved), [(tuple(t.shape), t.dtype) for t in saved]


@pytest.mark.parametrize("n", [2, 4])
def test_sinkhorn_matches_reference_and_keeps_only_the_logits(n, compare):
    """The PyTorch backend's Sinkhorn against autograd on the reference (values, gradients, second gradients),
    keeping only its logits for the backward (plain autograd kept all 2 iters + 1 iterates)."""
    from kromhc_vision.ops.pytorch import sinkhorn
    from kromhc_vision.ops.reference import sinkhorn as sinkhorn_reference
    logits = (3 * torch.randn(3, 5, n, n, dtype=torch.float64)).requires_grad_()
    compare(sinkhorn, sinkhorn_reference, [logits], (20,))
    assert torch.autograd.gradcheck(lambda a: sinkhorn(a, 5), [logits])
    assert torch.autograd.gradgradcheck(lambda a: sinkhorn(a, 5), [logits])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sinkhorn(logits.float().detach().requires_grad_(), 20)
    assert [(tuple(t.shape), t.dtype) for t in saved] == [((3, 5, n, n), torch.float32)]
