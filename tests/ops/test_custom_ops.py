"""The kernel ops' two paths: eager mode runs their Python functions in a torch.autograd.Function, a compiler the
registered custom ops; both give the same values and gradients, bitwise."""
import importlib

import pytest
import torch

post = importlib.import_module("kromhc_vision.ops.numba.stream_post")
sinkhorn = importlib.import_module("kromhc_vision.ops.numba.sinkhorn")


def _grads(fn, inputs, seed=0):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)))
    return out.detach(), [t.grad for t in leaves], out.grad_fn


def test_eager_path_equals_the_custom_op_bitwise():
    T, n, C = 37, 4, 24
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(T, n, C, generator=g), torch.randn(T, C, generator=g), torch.rand(T, n, n, generator=g),
              torch.rand(T, n, generator=g)]
    out_eager, grads_eager, node = _grads(post.stream_post, inputs)
    out_op, grads_op, op_node = _grads(post._stream_post_fwd, inputs)
    assert type(node).__name__.startswith("Eager_") and not type(op_node).__name__.startswith("Eager_")
    assert torch.equal(out_eager, out_op) and all(torch.equal(a, b) for a, b in zip(grads_eager, grads_op))
    logits = [torch.randn(T, n, n, generator=g)]
    out_eager, grads_eager, node = _grads(lambda x: sinkhorn.sinkhorn(x, 7), logits)
    out_op, grads_op, _ = _grads(lambda x: sinkhorn._sinkhorn_fwd(x, 7), logits)
    assert type(node).__name__.startswith("Eager_")
    assert torch.equal(out_eager, out_op) and torch.equal(grads_eager[0], grads_op[0])


def test_traced_inputs_take_the_custom_op():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        X, y, h, hp = torch.empty(5, 2, 8), torch.empty(5, 8), torch.empty(5, 2, 2), torch.empty(5, 2)
        out = post.stream_post(X, y, h, hp)  # the eager function would call .numpy() on a fake tensor
    assert out.shape == (5, 2, 8)


@pytest.mark.parametrize("variant", ["kromhc", "mhc"])
def test_no_grad_builds_no_autograd_function(variant, monkeypatch):
    """Where autograd records nothing (inference), the numba ops run their functions without an autograd Function
    (its context costs tens of microseconds a call); the model's output is the recorded path's to rounding (the
    ops' own outputs bitwise: the next test)."""
    import timm

    import kromhc_vision  # noqa: F401  (registers the models)
    from kromhc_vision.ops import _custom_ops
    numba_pre = importlib.import_module("kromhc_vision.ops.numba.stream_pre")
    model = timm.create_model(f"vit_micro_patch4_32_{variant}", hc_backend="numba").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = model(x)  # grad mode on, parameters require grad: the Functions run

    def refuse(*args):
        raise AssertionError("an autograd Function ran where autograd records nothing")

    for function in [*_custom_ops._EAGER_FUNCTIONS.values(), numba_pre.StreamPre]:
        monkeypatch.setattr(function, "apply", refuse)
    with torch.no_grad():  # timm's own layers may pick other kernels without grad: values to rounding
        torch.testing.assert_close(model(x), expected)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected)


def test_no_grad_stream_pre_equals_the_function_bitwise():
    pre = importlib.import_module("kromhc_vision.ops.numba.stream_pre")
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2, 7, 4, 16, generator=g)
    params = [torch.rand(64, generator=g) + 0.5, 0.1 * torch.randn(64, 12, generator=g), torch.rand(12, generator=g),
              torch.randn(12, generator=g)]
    params = [p.requires_grad_() for p in params]
    recorded = pre.stream_pre(X, *params, 1e-6)
    assert recorded[0].grad_fn is not None
    with torch.no_grad():
        alone = pre.stream_pre(X, *params, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(recorded, alone))


def test_forward_mode_ad_is_refused_not_dropped():
    """The Functions define no ``jvp``: dual inputs raise, also under no_grad, instead of losing their tangents."""
    import torch.autograd.forward_ad as fwAD
    X, y, h, hp = torch.randn(5, 2, 8), torch.randn(5, 8), torch.rand(5, 2, 2), torch.rand(5, 2)
    with fwAD.dual_level(), torch.no_grad():
        dual = fwAD.make_dual(X, torch.randn_like(X))
        with pytest.raises(NotImplementedError, match="jvp"):
            post.stream_post(dual, y, h, hp)
