"""The numba ops whose bodies :func:`kromhc_vision.ops.numba._launch.launch` runs (``stream_post``, ``sinkhorn``,
``permutation_mix``) split their tokens among threads themselves: for any thread count, more threads than tokens
and no tokens included, every output value is written once and equals the reference's (the outputs start as NaN,
so a token no thread took shows), and each body gets as many arguments as its ``*_ARGS`` tuple names."""
import importlib
import math

import numpy as np
import pytest
import torch

from kromhc_vision.ops.numba import _launch
from kromhc_vision.ops.reference import sinkhorn as sinkhorn_reference, stream_post as stream_post_reference
from kromhc_vision.permutations import permutation_matrices
from kromhc_vision.residual_maps import kronecker_birkhoff

post, sinkhorn, mix = (importlib.import_module(f"kromhc_vision.ops.numba.{name}")
                       for name in ("stream_post", "sinkhorn", "permutation_mix"))
THREADS = [1, 3, 7]


def nans(*shape):
    return torch.full(shape, math.nan, dtype=torch.float64)


def pointers(*tensors):
    return [t.data_ptr() for t in tensors]


def reference_grads(fn, inputs, dout):
    """``fn(*inputs)`` and the gradients of ``<fn(*inputs), dout>`` with respect to ``inputs``."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, dout)


@pytest.fixture
def set_threads(monkeypatch):
    """``set_threads(module, threads)``: the module's ops run ``threads`` threads; returns the list of the argument
    counts its launches pass."""
    def set_threads(module, threads):
        counts = []

        def launch(body, threads, args):
            counts.append(len(args))
            return _launch.launch(body, threads, args)

        monkeypatch.setattr(module, "match_torch_threads", lambda: threads)
        monkeypatch.setattr(module, "launch", launch)
        return counts
    return set_threads


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("T", [0, 1, 5, 33])
def test_stream_post_any_split(T, threads, set_threads):
    counts = set_threads(post, threads)
    n, C = 3, 5
    X, y, h_res, h_post, dZ = (torch.randn(*s, dtype=torch.float64) for s in ((T, n, C), (T, C), (T, n, n), (T, n),
                                                                                (T, n, C)))
    out, grads = nans(T, n, C), [nans(*t.shape) for t in (X, y, h_res, h_post)]
    post._run(post._forward_body, n, torch.float64, T, C, pointers(X, y, h_res, h_post, out))
    post._run(post._backward_body, n, torch.float64, T, C, [1, *pointers(X, y, h_res, h_post, dZ, *grads)])
    expected, expected_grads = reference_grads(stream_post_reference, (X, y, h_res, h_post), dZ)
    for a, b in zip((out, *grads), (expected, *expected_grads)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert counts == [len(post.FORWARD_ARGS), len(post.BACKWARD_ARGS)]


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("T", [0, 1, 300])  # 300: three tasks of up to 128 tokens, the last partial
def test_sinkhorn_any_split(T, threads, set_threads):
    counts = set_threads(sinkhorn, threads)
    n, iters = 4, 5
    logits, dout = 2 * torch.randn(T, n, n, dtype=torch.float64), torch.randn(T, n, n, dtype=torch.float64)
    out, grad = nans(T, n, n), nans(T, n, n)
    sinkhorn._run(sinkhorn._forward_body, n, torch.float64, T, iters, pointers(logits, out))
    sinkhorn._run(sinkhorn._backward_body, n, torch.float64, T, iters, pointers(logits, dout, grad))
    expected, (expected_grad,) = reference_grads(lambda L: sinkhorn_reference(L, iters), (logits,), dout)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert counts == [len(sinkhorn.FORWARD_ARGS), len(sinkhorn.BACKWARD_ARGS)]


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("T", [0, 1, 5, 100])  # 100: four blocks of up to 32 tokens, the last partial
@pytest.mark.parametrize("factors", [(4,), (2, 3)])
def test_permutation_mix_any_split(factors, T, threads, set_threads):
    counts = set_threads(mix, threads)
    n, (forward_tables, backward_tables) = mix._tables(factors)
    m = forward_tables[0]
    logits, dout = 2 * torch.randn(T, m, dtype=torch.float64), torch.randn(T, n * n, dtype=torch.float64)
    out, grad = nans(T, n * n), nans(T, m)
    mix._run(mix._forward_body, torch.float64, forward_tables, T, pointers(logits, out))
    mix._run(mix._backward_body, torch.float64, backward_tables, T, pointers(logits, dout, grad))
    perms = [permutation_matrices(k, dtype=torch.float64) for k in factors]
    expected, (expected_grad,) = reference_grads(lambda L: kronecker_birkhoff(L, perms).reshape(T, n * n), (logits,),
                                                 dout)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert counts == [len(mix.FORWARD_ARGS), len(mix.BACKWARD_ARGS)]


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_sinkhorn_ops_refuse_no_iterations_before_launching(direction):
    """The custom ops, reachable without :func:`~kromhc_vision.ops.numba.sinkhorn`'s check, refuse
    ``num_iters < 1`` themselves, naming the value."""
    logits = torch.randn(3, 4, 4)
    op = getattr(torch.ops.kromhc_vision, f"cpu_sinkhorn_{direction}")
    with pytest.raises(ValueError, match="num_iters must be >= 1, got 0"):
        op(logits, 0) if direction == "fwd" else op(logits, 0, torch.randn(3, 4, 4))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba's print of the body's error
def test_a_body_that_fails_raises_in_its_launcher():
    """An exception inside a ``cfunc`` body is printed by numba, not raised: the body returns 0 instead of 1, and
    its launcher raises (the shared one, and ``stream_pre``'s), so that no op returns outputs left unwritten. Here
    Sinkhorn's scratch of a negative size (``num_iters = -1``, past the op's check) and the pre step's ``W_g^T``
    of ``k = -4`` rows."""
    T = 4
    logits, out = torch.randn(T, 4, 4, dtype=torch.float64), nans(T, 4, 4)
    args = (T, -1, _launch.bits_of_float(32.0), 1, *pointers(logits, out))
    with pytest.raises(RuntimeError, match="kernel body failed"):
        _launch.launch(sinkhorn._forward_body(4, np.float64).address, 1, args)
    pre = importlib.import_module("kromhc_vision.ops.numba.stream_pre")
    x = torch.randn(T, 2, 3, dtype=torch.float64)
    outs = [nans(T, 8) for _ in range(6)]
    with pytest.raises(RuntimeError, match="kernel body failed"):
        pre._forward_launcher(pre._forward_body(2, 0, np.float64).address, 1, *pointers(x, x, x, x, x), 1e-6,
                              *pointers(*outs), T, 3, -4)
