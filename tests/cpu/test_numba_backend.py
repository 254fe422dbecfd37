"""Whole connections on the numba backend against the PyTorch backend, eager and under torch.compile,
and how the backend is chosen."""
import pytest
import torch

import kromhc_vision as kv
from kromhc_vision import backend

VARIANTS = ["hc", "mhc", "mhclite", "kromhc"]


def connection_pair(variant, n, C, dtype=torch.float64):
    torch_conn = kv.build_connection(variant, n, C, backend="torch").to(dtype)
    with torch.no_grad():
        for p in torch_conn.parameters():
            p.add_(0.5 * torch.randn_like(p))
    numba_conn = kv.build_connection(variant, n, C, backend="numba").to(dtype)
    numba_conn.load_state_dict(torch_conn.state_dict())
    return torch_conn, numba_conn


def values_and_grads(conn, X, branch):
    out = conn(X, branch)
    cotangent = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return (out, *torch.autograd.grad(out, [X, *conn.parameters(), *branch.parameters()], cotangent))


@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("variant", VARIANTS)
def test_connection_matches_torch_backend(variant, n):
    torch_conn, numba_conn = connection_pair(variant, n, 40)
    branch = torch.nn.Linear(40, 40).double()
    X = torch.randn(2, 3, n, 40, dtype=torch.float64, requires_grad=True)
    expected = values_and_grads(torch_conn, X, branch)
    torch.testing.assert_close(values_and_grads(numba_conn, X, branch), expected, rtol=1e-9, atol=1e-10)


def test_torch_compile_fullgraph():
    """The custom ops are opaque to Dynamo: no graph break, and the compiled connection matches eager."""
    torch_conn, numba_conn = connection_pair("mhc", 4, 40, torch.float32)
    branch = torch.nn.Linear(40, 40)
    X = torch.randn(2, 3, 4, 40, requires_grad=True)
    compiled = torch.compile(numba_conn, fullgraph=True)
    torch.testing.assert_close(values_and_grads(compiled, X, branch), values_and_grads(torch_conn, X, branch),
                               rtol=1e-5, atol=2e-5)


def test_auto_runs_numba_on_cpu_and_falls_back_without_it(monkeypatch):
    cpu = torch.device("cpu")
    assert backend.use_numba("auto", cpu) and not backend.use_numba("torch", cpu)
    assert not backend.use_numba("auto", torch.device("cuda"))
    monkeypatch.setattr(backend, "_numba_import_error", lambda: "the numba kernels cannot be imported (test)")
    assert not backend.use_numba("auto", cpu)
    with pytest.raises(RuntimeError, match=r"backend 'numba' was requested but cannot run: .*\(test\)"):
        backend.use_numba("numba", cpu)
    with pytest.raises(RuntimeError, match="tensors are on 'cuda'"):
        backend.use_numba("numba", torch.device("cuda"))
