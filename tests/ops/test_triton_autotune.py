"""Triton kernels under autotuning: the first call after the autotuner benchmarked several configs
gives the reference's values and gradients.

The interpreter runs one config, so these tests replay autotuning: they give a kernel several configs
and a benchmarker that runs each candidate once (as Triton's ``do_bench`` does, on the real
arguments) and reports the larger blocks as faster.
"""
import pytest
import torch
import triton

from kromhc_vision.ops.reference import stream_pre as stream_pre_reference
from kromhc_vision.ops.triton import stream_pre, stream_post
from kromhc_vision.ops.triton.stream_pre import _stream_pre_bwd_kernel, _stream_pre_dw_kernel, _stream_pre_fwd_kernel
from kromhc_vision.ops.triton.stream_post import _stream_post_bwd_kernel, _stream_post_fwd_kernel
from kromhc_vision.ops.reference import stream_post as stream_post_reference


def _larger_blocks_win(calls):
    """A ``do_bench`` stand-in: runs the candidate once; each later candidate is reported faster."""
    def bench(kernel_call, quantiles=None):
        kernel_call()
        calls.append(None)
        t = 1.0 / len(calls)
        return [t, t, t]
    return bench


def _replay(monkeypatch, kernel, configs):
    """Give ``kernel`` these configs (no pruning: the GPU resource estimates do not apply to the interpreter),
    an empty tuning cache and the benchmarker above; returns its call log."""
    calls = []
    monkeypatch.setattr(kernel, "early_config_prune", None)
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setitem(vars(kernel), "do_bench", _larger_blocks_win(calls))  # a cached_property of Autotuner
    return calls


def _pre_inputs(n, C, m, T, dtype=torch.float64):
    K = 2 * n + m
    X = torch.randn(T, n, C, dtype=dtype)
    params = (1 + 0.3 * torch.randn(n * C), 0.2 * torch.randn(n * C, K), torch.randn(K), torch.randn(K))
    return [X.requires_grad_()] + [p.to(dtype).requires_grad_() for p in params]


# BLOCK_T 16 then 32 then 64: the winner launches fewer programs than the first candidate benchmarked.
PRE_CONFIGS = [triton.Config(dict(BLOCK_T=bt, BLOCK_C=32), num_warps=1) for bt in (16, 32, 64)]
DW_CONFIGS = [triton.Config(dict(BLOCK_T=bt, BLOCK_D=32), num_warps=1) for bt in (16, 32)]


@pytest.mark.parametrize("T", [100, 37])
def test_stream_pre_first_backward_after_autotuning(monkeypatch, T):
    """ds and db are per-program partial sums; the first backward for a new autotune key (when the
    benchmark runs of every candidate have written the partial buffer) matches the reference."""
    bwd_calls = _replay(monkeypatch, _stream_pre_bwd_kernel, PRE_CONFIGS)
    fwd_calls = _replay(monkeypatch, _stream_pre_fwd_kernel, PRE_CONFIGS)
    dw_calls = _replay(monkeypatch, _stream_pre_dw_kernel, DW_CONFIGS)
    inputs = _pre_inputs(2, 40, 2, T)
    out = stream_pre(*inputs, 1e-6)
    expected = stream_pre_reference(*inputs, 1e-6)
    cotangents = [torch.randn_like(e) for e in expected[:4]]
    grads = torch.autograd.grad(out[:4], inputs, cotangents)
    expected_grads = torch.autograd.grad(expected[:4], inputs, cotangents)
    assert len(bwd_calls) == 3 and len(fwd_calls) == 3 and len(dw_calls) == 2, "every candidate was benchmarked"
    assert _stream_pre_bwd_kernel.best_config.kwargs["BLOCK_T"] == 64
    for name, a, e in zip(("u", "h_pre", "h_post", "a_res"), out, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    for name, a, e in zip(("dX", "dg", "dW", "ds", "db"), grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-11, msg=lambda m: f"{name}: {m}")


POST_CONFIGS = [triton.Config(dict(BLOCK_T=bt, BLOCK_C=32), num_warps=1) for bt in (2, 4, 8)]


def test_stream_post_first_call_after_autotuning(monkeypatch):
    """stream_post's outputs are written whole by every config: the first call after tuning is right."""
    _replay(monkeypatch, _stream_post_fwd_kernel, POST_CONFIGS)
    _replay(monkeypatch, _stream_post_bwd_kernel, POST_CONFIGS)
    n, C, T = 3, 40, 13
    inputs = [torch.randn(T, n, C, dtype=torch.float64), torch.randn(T, C, dtype=torch.float64),
              torch.randn(T, n, n, dtype=torch.float64), torch.randn(T, n, dtype=torch.float64)]
    inputs = [t.requires_grad_() for t in inputs]
    out, expected = stream_post(*inputs), stream_post_reference(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    dz = torch.randn_like(expected)
    for a, e in zip(torch.autograd.grad(out, inputs, dz), torch.autograd.grad(expected, inputs, dz)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-11)


def test_configs_are_chosen_per_device_kind(monkeypatch):
    """Triton keys the configs it chose by the launch's sizes and dtypes only: in a process with two kinds of GPU
    a config chosen on one (pruned for its shared memory) was launched on the other. Chosen per kind of device now:
    a second kind tunes again, and the first kind's choice is used again when it comes back."""
    from kromhc_vision.ops.triton import _common
    calls = _replay(monkeypatch, _stream_post_fwd_kernel, POST_CONFIGS)
    kind = ["gpu A"]
    monkeypatch.setattr(_common, "device_kind", lambda device: kind[0], raising=False)
    monkeypatch.setattr(_common, "_chosen", {}, raising=False)
    n, C, T = 3, 40, 13
    inputs = [torch.randn(T, n, C, dtype=torch.float64), torch.randn(T, C, dtype=torch.float64),
              torch.randn(T, n, n, dtype=torch.float64), torch.randn(T, n, dtype=torch.float64)]
    counts = []
    for kind[0] in ("gpu A", "gpu A", "gpu B", "gpu A", "gpu B"):
        torch.testing.assert_close(stream_post(*inputs), stream_post_reference(*inputs), rtol=1e-10, atol=1e-12)
        counts.append(len(calls))
    assert counts == [len(POST_CONFIGS)] * 2 + [2 * len(POST_CONFIGS)] * 3  # tuned once per kind
