import os

# Triton kernels run in Triton's CPU interpreter unless the caller chose otherwise (a GPU machine
# can export TRITON_INTERPRET=0). Must be set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Kernel tests (Triton and numba) compare an op with its reference in values and gradients.
# (rtol, atol) for values and for gradients, by the dtype of the tensor compared.
TOLERANCES = {
    torch.float64: ((1e-10, 1e-12), (1e-10, 1e-11)),
    torch.float32: ((1e-5, 1e-5), (1e-5, 2e-5)),  # values: K = n*C-term dot products summed in a different order
    torch.bfloat16: ((1.6e-2, 1e-2), (1.6e-2, 1e-2)),
}


def _close(actual, expected, which, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    rtol, atol = TOLERANCES[expected.dtype][which]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _compare(op, reference, inputs, args=()):
    """``op(*inputs, *args)`` equals ``reference(*inputs, *args)``, and so do the gradients wrt every
    input that requires grad for one random cotangent of all outputs."""
    def run(f):
        out = f(*inputs, *args)
        return out if isinstance(out, tuple) else (out,)

    out, expected = run(op), run(reference)
    for i, (a, e) in enumerate(zip(out, expected)):
        _close(a, e, 0, f"output {i}")
    leaves = [t for t in inputs if t.requires_grad]
    cotangents = [torch.randn_like(e) for e in expected]
    grads = torch.autograd.grad(out, leaves, cotangents)
    expected_grads = torch.autograd.grad(expected, leaves, cotangents)
    for i, (a, e) in enumerate(zip(grads, expected_grads)):
        _close(a, e, 1, f"gradient {i}")


@pytest.fixture
def compare():
    return _compare


def _stream_pre_inputs(lead, n, C, m, dtype=torch.float64):
    """``stream_pre``'s tensors ``X (*lead, n, C), norm_weight (nC,), proj_weight (nC, 2n+m), scale, bias
    (2n+m,)``, all requiring grad; the projection large enough that the coefficients vary."""
    k = 2 * n + m
    return [
        torch.randn(*lead, n, C, dtype=dtype, requires_grad=True),
        (1 + 0.3 * torch.randn(n * C, dtype=dtype)).requires_grad_(),
        (0.5 * torch.randn(n * C, k, dtype=dtype)).requires_grad_(),
        torch.randn(k, dtype=dtype, requires_grad=True),
        torch.randn(k, dtype=dtype, requires_grad=True),
    ]


@pytest.fixture
def stream_pre_inputs():
    return _stream_pre_inputs
