"""numba ``stream_pre`` token kernels against the PyTorch functions they replace (:mod:`kromhc_vision.ops.pytorch.stream_pre`)."""
import importlib

import pytest
import torch

# the modules (each package's ``stream_pre`` attribute is the op)
stream_pre = importlib.import_module("kromhc_vision.ops.numba.stream_pre")
mixing = importlib.import_module("kromhc_vision.ops.pytorch.stream_pre")


def forward_inputs(T, n, m, C, dtype, padded=0):
    k = 2 * n + m
    return (torch.randn(T, n, C, dtype=dtype), torch.randn(T, k + padded, dtype=dtype),
            torch.randn(k, dtype=dtype), torch.randn(k, dtype=dtype))


def backward_inputs(T, n, m, C, dtype, padded=0):
    x, raw, scale, _ = forward_inputs(T, n, m, C, dtype, padded)
    h_pre, h_post = torch.rand(T, n, dtype=dtype), 2 * torch.rand(T, n, dtype=dtype)
    inv_rms = torch.rand(T, 1, dtype=dtype) + 0.5
    return (x, torch.randn(T, n, C, dtype=dtype), torch.randn(T, C, dtype=dtype), torch.randn(T, n, dtype=dtype),
            torch.randn(T, n, dtype=dtype), torch.randn(T, m, dtype=dtype), h_pre, h_post, raw, inv_rms, scale)


def tolerances(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)


SHAPES = [(1, 2, 4, 1, 0), (7, 3, 6, 40, 2), (300, 4, 24, 72, 0), (5, 8, 4, 40, 4), (0, 4, 4, 8, 4)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T, n, m, C, padded", SHAPES)
def test_forward_matches_torch(T, n, m, C, padded, dtype):
    inputs = forward_inputs(T, n, m, C, dtype, padded)
    expected = mixing.pre_tokens_forward(*inputs, 1e-6)
    torch.testing.assert_close(stream_pre.pre_tokens_forward(*inputs, 1e-6), expected, **tolerances(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T, n, m, C, padded", SHAPES)
def test_backward_matches_torch(T, n, m, C, padded, dtype):
    inputs = backward_inputs(T, n, m, C, dtype, padded)
    dx, da, draw = stream_pre.pre_tokens_backward(*inputs)
    torch.testing.assert_close((dx, da, draw), mixing.pre_tokens_backward(*inputs), **tolerances(dtype))
    assert not draw[:, 2 * n + m:].any(), "the padding columns of draw must be zero (they meet W_g's zero columns)"


def test_every_output_entry_is_written(monkeypatch):
    """Outputs allocated full of NaN: the kernels must write every entry, the padding columns of draw included."""
    for name in ("_forward_outputs", "_backward_outputs"):
        allocate = getattr(stream_pre, name)
        monkeypatch.setattr(stream_pre, name, lambda *a, f=allocate: tuple(t.fill_(float("nan")) for t in f(*a)))
    inputs = forward_inputs(7, 3, 6, 40, torch.float64, 2)
    torch.testing.assert_close(stream_pre.pre_tokens_forward(*inputs, 1e-6), mixing.pre_tokens_forward(*inputs, 1e-6))
    inputs = backward_inputs(7, 3, 6, 40, torch.float64, 2)
    torch.testing.assert_close(stream_pre.pre_tokens_backward(*inputs), mixing.pre_tokens_backward(*inputs))


@pytest.mark.parametrize("missing", ["dX_post", "du", "both"])
def test_backward_without_state_or_u_gradient(missing):
    inputs = list(backward_inputs(6, 3, 6, 20, torch.float64, 2))
    if missing in ("dX_post", "both"):
        inputs[1] = None
    if missing in ("du", "both"):
        inputs[2] = None
    torch.testing.assert_close(stream_pre.pre_tokens_backward(*inputs), mixing.pre_tokens_backward(*inputs),
                               rtol=1e-12, atol=1e-12)


def test_forward_extreme_inputs_stay_finite():
    """Saturated sigmoids (logits far beyond +-100) give exactly 0, 1 or 2, not NaN."""
    x, raw, scale, bias = forward_inputs(9, 4, 8, 16, torch.float32)
    bias = torch.where(torch.arange(bias.shape[0]) % 2 == 0, 1e4, -1e4)
    u, h_pre, h_post, a_res, inv_rms = stream_pre.pre_tokens_forward(x, raw, scale, bias, 1e-6)
    assert all(t.isfinite().all() for t in (u, h_pre, h_post, a_res, inv_rms))
    assert set(h_pre.unique().tolist()) <= {0.0, 1.0} and set(h_post.unique().tolist()) <= {0.0, 2.0}


def test_opcheck():
    torch.library.opcheck(torch.ops.kromhc_vision.cpu_stream_pre_fwd.default,
                          (*forward_inputs(5, 3, 6, 40, torch.float64, 2), 1e-6))
    torch.library.opcheck(torch.ops.kromhc_vision.cpu_stream_pre_bwd.default,
                          backward_inputs(5, 3, 6, 40, torch.float64, 2))
