"""The numba pre and post steps of one connection, linked: the post step's backward hands ``(dZ, H_res)`` to the
pre step's (:class:`kromhc_vision.ops.numba._common.PostGradLink`) instead of forming ``dX = H_res^T dZ``.
Gradients against the reference ops differentiated by autograd, in every way the pair can be used."""
import importlib

import pytest
import torch

from kromhc_vision.ops import _custom_ops
from kromhc_vision.ops import reference

numba_pre = importlib.import_module("kromhc_vision.ops.numba.stream_pre")
numba_post = importlib.import_module("kromhc_vision.ops.numba.stream_post")
EPS = 1e-6
NUMBA = (numba_pre.stream_pre, numba_post.stream_post)
REFERENCE = (reference.stream_pre, reference.stream_post)


def _weights(t, seed):
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=t.dtype)


def connection(ops, X, g, W, s, b, y, posts=1, alias_loss=False):
    """A connection on ``X`` with branch ``y * u`` (HC's ``H_res``); ``posts`` post steps on the same pre
    step; ``alias_loss``: the state the pre step returned also feeds the loss directly. Returns the loss."""
    pre, post = ops
    outs = pre(X, g, W, s, b, EPS)
    u, _, h_post, a_res, state = outs
    h_res = a_res.unflatten(-1, X.shape[-2:-1] * 2)
    loss = sum((post(state, y * u, h_res, h_post) * _weights(state, i)).sum() for i in range(posts))
    if alias_loss:
        loss = loss + (state * _weights(state, 99)).sum()
    return loss


@pytest.fixture(params=[4, 3], ids=["n4", "n3"])  # the kernel spells n = 4 out; any other n loops
def inputs(request, stream_pre_inputs):
    n = request.param
    X, g, W, s, b = stream_pre_inputs((3, 5), n, 8, n * n)
    return [X, g, W, s, b, torch.randn(3, 5, 8, dtype=X.dtype, requires_grad=True)]


@pytest.fixture
def formed_dX(monkeypatch):
    """Token counts of the ``dX`` every numba post backward returns (0: not formed, left to the pre step)."""
    seen = []
    impl = _custom_ops._IMPLEMENTATIONS[numba_post._stream_post_bwd]

    def spy(*args):
        out = impl(*args)
        seen.append(out[0].shape[0])
        return out

    monkeypatch.setitem(_custom_ops._IMPLEMENTATIONS, numba_post._stream_post_bwd, spy)
    return seen


def assert_grads_equal(inputs, **kwargs):
    ours = torch.autograd.grad(connection(NUMBA, *inputs, **kwargs), inputs)
    ref = torch.autograd.grad(connection(REFERENCE, *inputs, **kwargs), inputs)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_linked_post_step_leaves_dX_to_the_pre_step(inputs, formed_dX):
    assert_grads_equal(inputs)
    assert formed_dX == [0]


def test_second_post_step_on_the_same_state_forms_its_dX(inputs, formed_dX):
    """Only the first post step claims the link; the other's gradient reaches the pre step through autograd."""
    assert_grads_equal(inputs, posts=2)
    assert sorted(formed_dX) == [0, 3]


def test_state_also_used_elsewhere(inputs, formed_dX):
    """The alias's other gradient arrives as ``dX_post`` and is added to the linked ``H_res^T dZ``."""
    assert_grads_equal(inputs, alias_loss=True)
    assert formed_dX == [0]


def test_a_link_put_in_another_backward_pass_is_not_taken(inputs):
    """A backward pass that runs the post step but not the pre step (gradient of ``y`` alone) leaves ``(dZ, H_res)``
    in the link; the next pass, which runs only the pre step, must not add it."""
    X, g, W, s, b, y = inputs
    u, h_pre, h_post, a_res, state = numba_pre.stream_pre(X, g, W, s, b, EPS)
    out = numba_post.stream_post(state, y, a_res.unflatten(-1, X.shape[-2:-1] * 2), h_post)
    torch.autograd.grad((out * _weights(out, 0)).sum(), y, retain_graph=True)
    other = (u * _weights(u, 1)).sum() + (h_pre * _weights(h_pre, 2)).sum()
    ours = torch.autograd.grad(other, (X, g, W, s, b))
    u_ref, h_pre_ref, *_ = reference.stream_pre(X, g, W, s, b, EPS)
    ref = torch.autograd.grad((u_ref * _weights(u, 1)).sum() + (h_pre_ref * _weights(h_pre, 2)).sum(), (X, g, W, s, b))
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_not_linked_without_grad(inputs):
    """No link where autograd records nothing (the pre step returns ``X`` itself, no Function)."""
    with torch.no_grad():
        state = numba_pre.stream_pre(*inputs[:5], EPS)[4]
    assert state is inputs[0] and getattr(state, numba_post.LINK_ATTRIBUTE, None) is None


def test_broadcast_gradient_is_laid_out_once(inputs, monkeypatch):
    """A sum's gradient arrives at the post step as a broadcast view: the linked pair lays it out once, and the
    pre step's backward gets that contiguous ``dZ`` (not the view, which its kernel would copy again)."""
    seen = []
    impl = _custom_ops._IMPLEMENTATIONS[numba_pre._stream_pre_bwd]

    def spy(X, dX_post, dZ, *rest):
        seen.append(dZ.is_contiguous() and dZ.shape[0] != 0)
        return impl(X, dX_post, dZ, *rest)

    monkeypatch.setitem(_custom_ops._IMPLEMENTATIONS, numba_pre._stream_pre_bwd, spy)
    X, g, W, s, b, y = inputs
    u, _, h_post, a_res, state = numba_pre.stream_pre(X, g, W, s, b, EPS)
    numba_post.stream_post(state, y * u, a_res.unflatten(-1, X.shape[-2:-1] * 2), h_post).sum().backward()
    assert seen == [True]
