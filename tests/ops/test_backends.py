"""Whole connections on each kernel backend (Triton, in its interpreter here; numba) against the PyTorch
backend, eager and under torch.compile."""
import pytest
import torch

import kromhc_vision as kv

VARIANTS = ["hc", "mhc", "mhclite", "kromhc"]


BACKENDS = ["triton", "numba"]


def connection_pair(variant, n, C, backend, dtype=torch.float64):
    torch_conn = kv.build_connection(variant, n, C, backend="torch").to(dtype)
    with torch.no_grad():
        for p in torch_conn.parameters():
            p.add_(0.5 * torch.randn_like(p))
    kernel_conn = kv.build_connection(variant, n, C, backend=backend).to(dtype)
    kernel_conn.load_state_dict(torch_conn.state_dict())
    return torch_conn, kernel_conn


def values_and_grads(conn, X, branch):
    out = conn(X, branch)
    cotangent = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return (out, *torch.autograd.grad(out, [X, *conn.parameters(), *branch.parameters()], cotangent))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("variant", VARIANTS)
def test_connection_matches_torch_backend(variant, n, backend):
    torch_conn, kernel_conn = connection_pair(variant, n, 40, backend)
    branch = torch.nn.Linear(40, 40).double()
    X = torch.randn(2, 3, n, 40, dtype=torch.float64, requires_grad=True)
    expected = values_and_grads(torch_conn, X, branch)
    torch.testing.assert_close(values_and_grads(kernel_conn, X, branch), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_can_be_changed_in_place(variant, backend):
    """``u`` (B, N, C), handed to the branch, and ``X_next`` (B, N, n, C), returned, are tensors of their own,
    not views made inside an autograd Function, which autograd refuses to change in place (the PyTorch backend
    raised): a branch that starts with ``relu_`` and a forward hook's ``out.mul_(2)`` give the values and
    gradients (w.r.t. X and every parameter) of ``relu`` and ``out * 2`` on the PyTorch backend, n = 4, float64."""
    torch_conn, conn = connection_pair(variant, 4, 40, backend)
    linear = torch.nn.Linear(40, 40).double()
    X = torch.randn(2, 3, 4, 40, dtype=torch.float64, requires_grad=True)
    out = conn(X, torch.nn.Sequential(torch.nn.ReLU(inplace=True), linear)).mul_(2)
    cotangent = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    got = (out, *torch.autograd.grad(out, [X, *conn.parameters(), *linear.parameters()], cotangent))
    expected = values_and_grads(torch_conn, X, torch.nn.Sequential(torch.nn.ReLU(), linear))
    torch.testing.assert_close(got, tuple(2 * t for t in expected), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """The custom ops are opaque to Dynamo: no graph break, and the compiled connection matches eager."""
    torch_conn, kernel_conn = connection_pair("mhc", 4, 40, backend, torch.float32)
    branch = torch.nn.Linear(40, 40)
    X = torch.randn(2, 3, 4, 40, requires_grad=True)
    compiled = torch.compile(kernel_conn, fullgraph=True)
    torch.testing.assert_close(values_and_grads(compiled, X, branch), values_and_grads(torch_conn, X, branch),
                               rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_stream_pre_gradients_in_each_parameters_own_dtype(backend):
    """Parameters of mixed dtypes (a float32 state, a bfloat16 scale, a float64 bias): each gradient is the
    reference's, computed in the compute dtype and rounded only to its own parameter's dtype (the bias's was
    rounded to the scale's bfloat16 on its way)."""
    from kromhc_vision.ops import dispatch, reference
    n, C, k = 2, 4, 8
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, n, C, generator=g)
    norm_weight, proj_weight = torch.ones(n * C), 0.5 * torch.randn(n * C, k, generator=g)
    scale = torch.randn(k, generator=g).to(torch.bfloat16)
    bias = 1 + 1e-3 * torch.randn(k, generator=g, dtype=torch.float64)

    def grads(stream_pre):
        params = [t.clone().requires_grad_() for t in (norm_weight, proj_weight, scale, bias)]
        u, h_pre, h_post, a_res, _ = stream_pre(X, *params, 1e-6)
        loss = (u * torch.linspace(-1, 1, u.numel()).view_as(u)).sum() + 3.14159 * a_res.double().sum() \
            + h_post.double().sum()
        return torch.autograd.grad(loss, params)

    expected = grads(reference.stream_pre)
    got = grads(lambda *args: dispatch.stream_pre(*args, backend=backend))
    assert [t.dtype for t in got] == [t.dtype for t in expected] == [torch.float32, torch.float32, torch.bfloat16,
                                                                        torch.float64]
    torch.testing.assert_close(got[3], expected[3], rtol=1e-5, atol=1e-5)  # bfloat16 rounding: ~1e-3
    torch.testing.assert_close(got[:2], expected[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-2, atol=1e-2)  # the scale's own bfloat16


@pytest.mark.parametrize("backend", ["reference", "torch", *BACKENDS])
def test_stream_pre_names_a_parameter_of_the_wrong_shape(backend):
    """Fewer than 2n coefficients, or a parameter that does not fit X: a ValueError naming it and the shape it must
    have (the reference returned a short h_post, the PyTorch backend failed in a reshape: "shape '[3, 4]' is
    invalid for input of size 9")."""
    from kromhc_vision.ops import dispatch, reference
    op = reference.stream_pre if backend == "reference" else \
        (lambda *args: dispatch.stream_pre(*args, backend=backend))
    n, C = 4, 8
    X = torch.randn(3, n, C)
    with pytest.raises(ValueError, match=r"proj_weight of shape \(32, 7\) .* k >= 2n = 8"):
        op(X, torch.ones(n * C), torch.randn(n * C, 7), torch.ones(7), torch.zeros(7), 1e-6)
    with pytest.raises(ValueError, match=r"bias has shape \(9,\); .* it must be \(10,\)"):
        op(X, torch.ones(n * C), torch.randn(n * C, 10), torch.ones(10), torch.zeros(9), 1e-6)
