"""How a backend is chosen for each op: ``auto``'s rules, named backends that cannot run, kernels' shape limits,
and ``auto`` running the PyTorch path when a Triton kernel fails."""
import warnings

import pytest
import torch

import kromhc_vision as kv
from kromhc_vision.ops import dispatch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_runs_numba_on_cpu_and_falls_back_without_it(monkeypatch):
    assert dispatch.backend_for("auto", CPU) == "numba" and dispatch.backend_for("torch", CPU) == "torch"
    assert dispatch.backend_for("auto", CUDA) != "numba"
    monkeypatch.setitem(dispatch._import_errors, "numba", "the numba kernels cannot be imported (test)")
    assert dispatch.backend_for("auto", CPU) == "torch"
    with pytest.raises(RuntimeError, match=r"backend 'numba' was requested but cannot run: .*\(test\)"):
        dispatch.backend_for("numba", CPU)
    with pytest.raises(RuntimeError, match="tensors are on 'cuda'"):
        dispatch.backend_for("numba", CUDA)


def test_auto_on_cuda_picks_triton_within_its_limits(monkeypatch):
    monkeypatch.setitem(dispatch._import_errors, "triton", None)
    assert dispatch.backend_for("auto", CUDA, "sinkhorn", 16) == "triton"
    assert dispatch.backend_for("auto", CUDA, "sinkhorn", 17) == "torch"
    assert dispatch.backend_for("auto", CUDA, "stream_post", 32) == "triton"
    # stream_pre's kernels spill above 256 (padded) coefficients: auto leaves mHC-lite n = 6 (732) to PyTorch
    assert dispatch.backend_for("auto", CUDA, "stream_pre", 6, 2 * 6 + 720) == "torch"
    assert dispatch.backend_for("auto", CUDA, "stream_pre", 4, 2 * 4 + 24) == "triton"
    assert dispatch.backend_for("auto", CUDA, "stream_pre", 16, 256) == "triton"


def test_kernel_limits_are_checked_when_the_connection_is_built():
    """Triton's Sinkhorn takes n <= 16: asking for it with n = 32 fails at construction, not at the first forward."""
    with pytest.raises(ValueError, match="backend 'triton' cannot run sinkhorn.*num_streams <= 16, got 32"):
        kv.build_connection("mhc", 32, 8, backend="triton")
    kv.build_connection("mhc", 32, 8, backend="auto")
    kv.build_connection("kromhc", 32, 8, backend="triton")  # no Sinkhorn


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'cuda'; valid choices: auto, triton, numba, torch"):
        dispatch.resolve_backend("cuda")


def test_an_unknown_backend_from_the_environment_says_where_it_came_from(monkeypatch):
    monkeypatch.setenv("KROMHC_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"unknown backend 'cuda' \(from \$KROMHC_BACKEND\); valid choices: auto"):
        kv.build_connection("hc", 4, 8)


def test_auto_runs_pytorch_once_a_triton_kernel_fails(monkeypatch):
    """Under ``auto`` a Triton kernel that cannot compile or launch warns once (naming the op and the reason)
    and the PyTorch path runs for that op and shape; ``triton`` raises."""
    def failing(*args):
        raise RuntimeError("out of resources (test)")

    triton_ops = dispatch.backend_module("triton")
    monkeypatch.setattr(dispatch, "backend_for", lambda *args, **kwargs: "triton")
    monkeypatch.setattr(triton_ops, "stream_post", failing)
    monkeypatch.setattr(dispatch, "_failed_kernels", {})
    X, y, h, hp = torch.randn(3, 4, 8), torch.randn(3, 8), torch.rand(3, 4, 4), torch.rand(3, 4)
    expected = dispatch.backend_module("torch").stream_post(X, y, h, hp)
    with pytest.warns(RuntimeWarning, match=r"Triton kernel for stream_post failed .*out of resources \(test\)"):
        out = dispatch.stream_post(X, y, h, hp, "auto")
    torch.testing.assert_close(out, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per op and shape
        torch.testing.assert_close(dispatch.stream_post(X, y, h, hp, "auto"), expected)
    with pytest.raises(RuntimeError, match=r"out of resources \(test\)"):
        dispatch.stream_post(X, y, h, hp, "triton")


def test_stream_pre_hands_auto_its_coefficient_count(monkeypatch):
    """``dispatch.stream_pre`` hands auto's rules ``2n + m`` (the projection's columns), not its rows ``n C``: with
    the device taken for CUDA, mHC-lite n = 6 (``X (3, 6, 4)``, 12 + 720 coefficients, 24 rows) gets PyTorch's op,
    and ``X (3, 2, 256)`` (8 coefficients, 512 rows) Triton's (the op then runs PyTorch's here, on CPU)."""
    monkeypatch.setitem(dispatch._import_errors, "triton", None)
    chosen, real = [], dispatch.backend_for

    def on_cuda(backend, device, op="stream_pre", num_streams=0, coefficients=0):
        chosen.append(real(backend, CUDA, op, num_streams, coefficients))
        return "torch"

    monkeypatch.setattr(dispatch, "backend_for", on_cuda)
    for n, C, k in ((6, 4, 2 * 6 + 720), (2, 256, 8)):
        X = torch.randn(3, n, C)
        dispatch.stream_pre(X, torch.ones(n * C), torch.randn(n * C, k), torch.ones(k), torch.zeros(k), 1e-6, "auto")
    assert chosen == ["torch", "triton"]


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_ops_refuse_bad_input_by_name_on_every_backend(backend):
    """The ops check their inputs once, before any backend runs: on the PyTorch backend a non-square Sinkhorn, 0
    iterations or integer logits ran (exp(logits), truncated H_res), stream_post's wrong shapes were reshape errors;
    on every backend an integer state gave an integer u, and 2.5 iterations a numba typing error."""
    from kromhc_vision import ops
    from kromhc_vision.permutations import permutation_matrices
    X, n, C = torch.randn(3, 4, 8), 4, 8
    params = (torch.ones(n * C), torch.zeros(n * C, 12), torch.ones(12), torch.zeros(12))
    y, h_res, h_post = torch.randn(3, C), torch.rand(3, n, n), torch.rand(3, n)
    perms = [permutation_matrices(2)] * 2
    cases = [
        (lambda: ops.stream_pre(X.long(), *params, 1e-6, backend), "stream_pre: X must be a floating-point tensor"),
        (lambda: ops.stream_pre(torch.randn(8), *params, 1e-6, backend), r"X of shape \(\.\.\., n, C\), got \(8,\)"),
        (lambda: ops.stream_post(X, torch.randn(2, C), h_res, h_post, backend),
         r"stream_post: y has shape \(2, 8\); for X \(3, 4, 8\) it must be \(3, 8\)"),
        (lambda: ops.stream_post(X, y, h_res[:, :3, :3], h_post, backend), r"h_res has shape \(3, 3, 3\)"),
        (lambda: ops.stream_post(X.long(), y, h_res, h_post, backend), "X must be a floating-point tensor"),
        (lambda: ops.sinkhorn(torch.randn(3, 4, 5), 3, backend), r"\(\.\.\., n, n\), got \(3, 4, 5\)"),
        (lambda: ops.sinkhorn(torch.randn(3, 4, 4), 0, backend), "num_iters must be an int >= 1, got 0"),
        (lambda: ops.sinkhorn(torch.randn(3, 4, 4), 2.5, backend), "num_iters must be an int >= 1, got 2.5"),
        (lambda: ops.sinkhorn(torch.ones(3, 4, 4, dtype=torch.long), 3, backend), "logits must be a floating-point"),
        (lambda: ops.permutation_mix(torch.randn(3, 5), perms, backend), r"factors \[2, 2\] .*\(\.\.\., 4\), got"),
        (lambda: ops.permutation_mix(torch.ones(3, 4, dtype=torch.long), perms, backend), "floating-point"),
        (lambda: ops.permutation_mix(torch.randn(3, 4), [], backend), "a non-empty list of"),
        (lambda: ops.permutation_mix(torch.randn(3, 5), [permutation_matrices(3)[:5]], backend),
         r"\(i_k!, i_k, i_k\) tensors"),  # not every permutation: the kernel backends' tables hold all
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def _triton_submodule(name):
    import sys
    dispatch.backend_module("triton")
    return sys.modules[f"kromhc_vision.ops.triton.{name}"]


def test_auto_runs_pytorch_once_a_triton_backward_kernel_fails(monkeypatch):
    """The backward kernels compile and launch at the first backward pass, after the forward succeeded: under
    ``auto`` the first call of an op and shape runs them once on zero gradients, and a failure there warns and
    gives PyTorch's op in both directions (it used to raise out of ``loss.backward()``); ``triton`` raises."""
    from kromhc_vision.ops import _custom_ops

    def failing(*args):
        raise RuntimeError("out of resources (test backward)")

    post, pre = _triton_submodule("stream_post"), _triton_submodule("stream_pre")
    monkeypatch.setattr(dispatch, "backend_for", lambda *args, **kwargs: "triton")
    monkeypatch.setattr(dispatch, "_failed_kernels", {})
    monkeypatch.setattr(dispatch, "_verified_backwards", set(), raising=False)
    monkeypatch.setitem(_custom_ops._IMPLEMENTATIONS, post._stream_post_bwd, failing)
    monkeypatch.setattr(pre, "_stream_pre_bwd", failing)
    torch_ops = dispatch.backend_module("torch")
    n, C, k = 3, 8, 15
    post_args = (torch.randn(3, n, C), torch.randn(3, C), torch.rand(3, n, n), torch.rand(3, n))
    pre_args = (torch.randn(2, 3, n, C), 1 + 0.1 * torch.randn(n * C), 0.2 * torch.randn(n * C, k), torch.randn(k),
                torch.randn(k))

    def grads(fn, args, *extra):
        leaves = [a.clone().requires_grad_() for a in args]
        out = fn(*leaves, *extra)
        out = (out,) if isinstance(out, torch.Tensor) else out
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out)
        return torch.autograd.grad(loss, leaves)

    for op, args, extra in (("stream_post", post_args, ()), ("stream_pre", pre_args, (1e-6,))):
        expected = grads(getattr(torch_ops, op), args, *extra)
        with pytest.warns(RuntimeWarning, match=rf"Triton kernel for {op} failed .*out of resources \(test backward\)"):
            got = grads(lambda *a: getattr(dispatch, op)(*a, backend="auto"), args, *extra)
        torch.testing.assert_close(got, expected)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per op and shape: PyTorch's path from now on
            torch.testing.assert_close(grads(lambda *a: getattr(dispatch, op)(*a, backend="auto"), args, *extra),
                                       expected)
        with pytest.raises(RuntimeError, match=r"out of resources \(test backward\)"):
            grads(lambda *a: getattr(dispatch, op)(*a, backend="triton"), args, *extra)


def test_auto_triton_backward_that_runs_is_used_and_trusted_after(monkeypatch):
    """Under ``auto`` a Triton backward that works gives the kernels' gradients, without a warning; it is probed
    once per op and shape, and what the probe ran is not what the call returns (its graph is the op's own)."""
    monkeypatch.setattr(dispatch, "backend_for", lambda *args, **kwargs: "triton")
    monkeypatch.setattr(dispatch, "_failed_kernels", {})
    monkeypatch.setattr(dispatch, "_verified_backwards", set(), raising=False)
    X, y, h, hp = (t.double().requires_grad_() for t in (torch.randn(3, 4, 8), torch.randn(3, 8),
                                                         torch.rand(3, 4, 4), torch.rand(3, 4)))
    expected = torch.autograd.grad(dispatch.backend_module("torch").stream_post(X, y, h, hp).sum(), (X, y, h, hp))
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = dispatch.stream_post(X, y, h, hp, "auto")
            torch.testing.assert_close(torch.autograd.grad(out.sum(), (X, y, h, hp)), expected)
    assert len(dispatch._verified_backwards) == 1
    assert type(out.grad_fn).__name__ == type(dispatch.backend_module("triton").stream_post(X, y, h, hp).grad_fn).__name__
