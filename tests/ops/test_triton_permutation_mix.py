"""Triton ``permutation_mix`` (mHC-lite's and KromHC's ``H_res``, in its interpreter here) against
:func:`kromhc_vision.residual_maps.kronecker_birkhoff` differentiated by autograd, for every factorisation shape
the kernels take, and PyTorch's ops for the shapes they do not."""
import importlib
import math

import pytest
import torch

import kromhc_vision as kv
from kromhc_vision.ops.triton import permutation_mix
from kromhc_vision.permutations import permutation_matrices
from kromhc_vision.residual_maps import kronecker_birkhoff, stochasticity_error

module = importlib.import_module("kromhc_vision.ops.triton.permutation_mix")  # the package's name is the op
FACTORS = [(2,), (3,), (4,), (5,), (2, 2), (2, 3), (3, 2), (2, 2, 2), (2, 2, 3), (2, 2, 2, 2), (2, 5), (3, 5)]


def logits_for(factors, lead, dtype, spread=2.0):
    m = sum(math.factorial(k) for k in factors)
    return (spread * torch.randn(*lead, m, dtype=dtype)).requires_grad_()


def perms_for(factors, dtype=torch.float32):
    return [permutation_matrices(k, dtype=dtype) for k in factors]


@pytest.mark.parametrize("lead", [(3, 7), (5, 23)])  # one partial tile of 16 tokens; several, the last partial
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("factors", FACTORS)
def test_matches_reference(factors, dtype, lead, compare):
    assert module.runs_kernel(factors)
    compare(permutation_mix, kronecker_birkhoff, [logits_for(factors, lead, dtype)], (perms_for(factors, dtype),))


def test_float64_exact_to_rounding():
    """In float64 the kernels' sums equal the reference's to a few ulps (values and gradients)."""
    factors = (2, 2, 3)
    logits = logits_for(factors, (40,), torch.float64)
    perms = perms_for(factors, torch.float64)
    H, ref = permutation_mix(logits, perms), kronecker_birkhoff(logits, perms)
    dout = torch.randn_like(H)
    torch.testing.assert_close(H, ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(H, logits, dout)[0], torch.autograd.grad(ref, logits, dout)[0],
                               rtol=0, atol=1e-13)


@pytest.mark.parametrize("factors", [(4,), (2, 2, 2), (2, 3)])
def test_doubly_stochastic_to_rounding(factors):
    """Each entry rounded once from float64 sums: rows and columns sum to 1 within n float32 roundings, also
    for saturated logits (the published init's -8 plus large values)."""
    H = permutation_mix(logits_for(factors, (100,), torch.float32, spread=30.0), perms_for(factors))
    assert stochasticity_error(H) <= math.prod(factors) * 2 ** -24


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NumPy, on NaN
@pytest.mark.parametrize("factors", [(4,), (2, 3)])
def test_non_finite_logits_give_what_the_reference_gives(factors):
    """A NaN or +inf logit makes its token's ``H`` NaN, as in the reference; and every logit -inf (0 / 0)."""
    logits = torch.randn(4, sum(math.factorial(k) for k in factors))
    logits[1, 0], logits[2, 1], logits[3] = float("nan"), float("inf"), float("-inf")
    expected, got = kronecker_birkhoff(logits, perms_for(factors)), permutation_mix(logits, perms_for(factors))
    assert torch.equal(got.isnan(), expected.isnan()) and got.isnan()[1:].all() and not got[0].isnan().any()
    torch.testing.assert_close(got[0], expected[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_taken_in_float32(dtype):
    """Half-precision logits (which the GPU compiler cannot convert to float64 for ``tl.dot``) give the float32
    result rounded to their dtype, and the float32 gradient rounded likewise."""
    factors = (2, 2)
    logits = logits_for(factors, (7,), torch.float32).detach()
    half = logits.to(dtype).requires_grad_()
    single = half.detach().float().requires_grad_()
    H, H32 = permutation_mix(half, perms_for(factors, dtype)), permutation_mix(single, perms_for(factors))
    assert H.dtype == dtype and torch.equal(H, H32.to(dtype))
    dout = torch.randn_like(H32).to(dtype).float()  # representable in dtype
    grad, grad32 = (torch.autograd.grad(h, x, d)[0] for h, x, d in ((H, half, dout.to(dtype)), (H32, single, dout)))
    assert grad.dtype == dtype and torch.equal(grad, grad32.to(dtype))


def test_zero_tokens_and_non_contiguous_logits(compare):
    perms = perms_for((2, 3), torch.float64)
    empty = logits_for((2, 3), (0,), torch.float64)
    H = permutation_mix(empty, perms)
    assert H.shape == (0, 6, 6) and torch.autograd.grad(H.sum(), empty)[0].shape == (0, 8)
    strided = logits_for((2, 3), (9, 16), torch.float64).detach()[:, ::2].requires_grad_()  # (9, 8), stride 16
    assert not strided.is_contiguous()
    compare(permutation_mix, kronecker_birkhoff, [strided], (perms,))


def test_gradient_of_non_finite_logits_stays_in_its_token():
    """A NaN logit makes its own token's gradient NaN and no other's; a -inf logit among finite ones has the
    reference's gradient (its weight is 0)."""
    factors = (2, 3)
    perms = perms_for(factors, torch.float64)
    logits = logits_for(factors, (5,), torch.float64).detach()
    logits[1, 3], logits[2, 0] = float("nan"), float("-inf")
    logits.requires_grad_()
    dout = torch.randn(5, 6, 6, dtype=torch.float64)
    grad = torch.autograd.grad(permutation_mix(logits, perms), logits, dout)[0]
    expected = torch.autograd.grad(kronecker_birkhoff(logits, perms), logits, dout)[0]
    assert grad[1].isnan().all() and not grad[[0, 2, 3, 4]].isnan().any()
    torch.testing.assert_close(grad[[0, 2, 3, 4]], expected[[0, 2, 3, 4]])


def test_gradcheck():
    for factors in [(3,), (2, 3)]:
        perms = perms_for(factors, torch.float64)
        assert torch.autograd.gradcheck(lambda x: permutation_mix(x, perms),
                                        (logits_for(factors, (2, 3), torch.float64),))


def test_opcheck():
    logits = torch.randn(5, 8, requires_grad=True)  # KromHC n = 6: 2! + 3!
    torch.library.opcheck(torch.ops.kromhc_vision.permutation_mix_fwd.default, (logits, [2, 3]))
    torch.library.opcheck(torch.ops.kromhc_vision.permutation_mix_bwd.default,
                          (logits.detach(), [2, 3], torch.randn(5, 6, 6)))


def test_backward_keeps_only_the_logits():
    """What autograd keeps is the logits (which the connection keeps anyway), not the softmax weights or the
    Kronecker factors PyTorch's ops keep: ``H_res`` with what its map saves fits recomputation's keep rule."""
    logits = logits_for((2, 2), (6,), torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        permutation_mix(logits, perms_for((2, 2)))
    assert len(saved) == 1 and saved[0] is logits


def test_shapes_beyond_the_tiles_run_pytorchs_ops(monkeypatch):
    """mHC-lite at n = 6 (720 logits) runs PyTorch's ops, with the same values; no kernel launch."""
    assert not module.runs_kernel((6,)) and module.runs_kernel((5,)) and module.runs_kernel((2, 2, 2, 2))
    launched = []
    monkeypatch.setattr(module, "_launch", lambda *a: launched.append(a))
    logits = logits_for((6,), (3,), torch.float64)
    torch.testing.assert_close(permutation_mix(logits, perms_for((6,), torch.float64)),
                               kronecker_birkhoff(logits, perms_for((6,), torch.float64)))
    assert launched == []


def test_rejects_logits_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\) logits for factors \(2, 2\)"):
        permutation_mix(torch.randn(3, 5), perms_for((2, 2)))


def test_torch_compile_fullgraph():
    """The custom op is opaque to Dynamo: a KromHC connection on the Triton backend compiles without a graph
    break and matches eager."""
    conn = kv.build_connection("kromhc", 4, 16, backend="triton")
    with torch.no_grad():
        conn.proj_weight.normal_()
    branch = torch.nn.Linear(16, 16)
    X = torch.randn(2, 5, 4, 16, requires_grad=True)
    eager = conn(X, branch)
    compiled = torch.compile(conn, fullgraph=True)(X, branch)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(y.sum(), [X, conn.bias]) for y in (compiled, eager)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant, n", [("mhclite", 4), ("kromhc", 4), ("kromhc", 8)])
def test_connections_run_the_kernel_on_triton(variant, n, monkeypatch):
    """mHC-lite's and KromHC's connections on the Triton backend form ``H_res`` with this kernel."""
    calls = []
    real = module._permutation_mix_fwd
    monkeypatch.setattr(module, "_permutation_mix_fwd", lambda *a: calls.append(a[1]) or real(*a))
    conn = kv.build_connection(variant, n, 8, backend="triton")
    conn(torch.randn(3, n, 8), torch.nn.Identity())
    assert len(calls) == 1 and math.prod(calls[0]) == n


def test_first_call_inside_a_cuda_graph_capture_says_to_warm_up(monkeypatch):
    """The kernels' tables are copied from the host on the first call for a shape and device, which a CUDA graph
    capture cannot record: a first call there raises, naming the warm-up; after one eager call the capture runs
    (the capture is simulated: this machine has no GPU)."""
    factors = (2, 3)
    logits, perms = logits_for(factors, (4,), torch.float32), perms_for(factors)
    monkeypatch.setattr(module, "_TABLES", {})
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"inside a CUDA graph capture.*run one step of the model eagerly"):
        permutation_mix(logits, perms)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    warm = permutation_mix(logits, perms)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    torch.testing.assert_close(permutation_mix(logits, perms), warm, rtol=0, atol=0)


@pytest.mark.parametrize("variant, n", [("mhclite", 3), ("kromhc", 6)])
def test_connections_make_the_tables_when_built_and_moved(variant, n, monkeypatch):
    """On the Triton backend an mHC-lite or KromHC connection makes the kernels' tables when built and when moved
    (``Module._apply``), so that its first forward pass makes none: it runs inside a (simulated) CUDA graph capture.
    On the numba backend (``auto`` on CPU) it makes none."""
    from kromhc_vision.connections import build_connection
    monkeypatch.setattr(module, "_TABLES", {})
    build_connection(variant, n, 8)
    assert module._TABLES == {}
    conn = build_connection(variant, n, 8, backend="triton")
    factors = tuple(getattr(conn, "factors", (n,)))
    assert set(module._TABLES) == {(factors, torch.device("cpu"))}
    module._TABLES.clear()
    conn.double()
    assert set(module._TABLES) == {(factors, torch.device("cpu"))}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    a_res = torch.randn(5, sum(math.factorial(k) for k in factors), dtype=torch.float64)
    torch.testing.assert_close(conn.res_matrix(a_res), kronecker_birkhoff(a_res, perms_for(factors, torch.float64)))
