"""Triton ``stream_pre`` against :func:`stream_pre_reference`: values and all five gradients."""
import pytest
import torch

from kromhc_vision.ops.reference import stream_pre as stream_pre_reference
from kromhc_vision.ops.triton import stream_pre

# (n, C, m, leading dims): C not a multiple of the block, token counts not a multiple of BLOCK_T;
# the last has enough tokens for the weight-gradient GEMM to split over tokens.
SHAPES = [(2, 40, 2, (3, 7)), (3, 72, 6, (5,)), (4, 40, 16, (2, 3, 3)), (6, 72, 3, (9,)), (8, 40, 64, (17,)),
          (2, 24, 2, (130,))]


def make_inputs(n, C, m, lead, dtype=torch.float64, param_dtype=None):
    param_dtype = param_dtype or dtype
    K = 2 * n + m
    X = torch.randn(*lead, n, C, dtype=dtype)
    params = (1 + 0.3 * torch.randn(n * C), 0.2 * torch.randn(n * C, K), torch.randn(K), torch.randn(K))
    return [X.requires_grad_()] + [p.to(param_dtype).requires_grad_() for p in params]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, C, m, lead", SHAPES)
def test_matches_reference(n, C, m, lead, dtype, compare):
    compare(stream_pre, stream_pre_reference, make_inputs(n, C, m, lead, dtype), (1e-6,))


def test_bfloat16_streams_float32_coefficients(compare):
    inputs = make_inputs(4, 72, 4, (2, 5), torch.bfloat16, torch.float32)
    u, h_pre, h_post, a_res, _ = stream_pre(*inputs, 1e-6)
    assert u.dtype == torch.bfloat16 and h_pre.dtype == h_post.dtype == a_res.dtype == torch.float32
    compare(stream_pre, stream_pre_reference, inputs, (1e-6,))


@pytest.mark.parametrize("used", ["u", "coefficients"])
def test_gradient_with_unused_outputs(used):
    """Only ``u`` or only the coefficients reach the loss: the op gets one gradient as None."""
    inputs = make_inputs(3, 40, 6, (4,))
    pick = (lambda out: out[0]) if used == "u" else (lambda out: torch.cat(out[1:4], -1))
    grads = [torch.autograd.grad(pick(f(*inputs, 1e-6)).square().sum(), inputs)
             for f in (stream_pre, stream_pre_reference)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-11)


def test_non_contiguous_and_empty_inputs():
    X, *params = make_inputs(2, 40, 2, (3,))
    X_t = torch.randn(3, 40, 2, dtype=X.dtype).transpose(1, 2)
    assert not X_t.is_contiguous()
    torch.testing.assert_close(stream_pre(X_t, *params, 1e-6), stream_pre_reference(X_t, *params, 1e-6))
    u, *coef, _ = stream_pre(X.new_empty(0, 2, 40), *params, 1e-6)
    assert u.shape == (0, 40) and [c.shape[-1] for c in coef] == [2, 2, 2]


def test_opcheck():
    X, *params = make_inputs(3, 40, 6, (5,))
    torch.library.opcheck(torch.ops.kromhc_vision.stream_pre_fwd.default, (X, *params, 1e-6))
    detached = [t.detach() for t in (X, *params)]
    grads = (torch.randn(5, 40, dtype=X.dtype), torch.randn(5, 12, dtype=X.dtype))
    torch.library.opcheck(torch.ops.kromhc_vision.stream_pre_bwd.default, (*detached, 1e-6, *grads))
    # a transposed stream state and projection: the fake's outputs have the op's (contiguous) strides
    X_t = detached[0].transpose(-1, -2).contiguous().transpose(-1, -2)
    W_t = detached[2].t().contiguous().t()
    assert not X_t.is_contiguous() and not W_t.is_contiguous()
    torch.library.opcheck(torch.ops.kromhc_vision.stream_pre_bwd.default,
                          (X_t, detached[1], W_t, *detached[3:], 1e-6, *grads))


def test_zero_eps_gradients_of_a_partial_token_block():
    """eps = 0 with a token count not a multiple of BLOCK_T: the block's padding rows (x = 0) must not put
    rsqrt(0) = inf, then 0 * inf = NaN, into the per-program sums of the scale and bias gradients."""
    inputs = make_inputs(2, 24, 2, (3,))
    outs = [f(*inputs, 0.0)[:4] for f in (stream_pre, stream_pre_reference)]
    cotangents = [torch.randn_like(t) for t in outs[0]]
    grads = [torch.autograd.grad(out, inputs, cotangents) for out in outs]
    assert all(g.isfinite().all() for g in grads[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-11)
