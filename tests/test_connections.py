"""The connection library: shapes, exact double stochasticity, inits, gradients, dtypes, compile."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kromhc_vision as kv
from kromhc_vision.permutations import kronecker_factors, permutation_matrices
from kromhc_vision.ops.reference import sinkhorn as sinkhorn_reference
from kromhc_vision.residual_maps import birkhoff, kronecker

VARIANTS = ["hc", "mhc", "mhclite", "kromhc"]
EXACT = ["mhclite", "kromhc"]


def randomize(conn, std=0.5):
    """Move a connection away from its init so that coefficients depend on the input."""
    with torch.no_grad():
        for p in conn.parameters():
            p.add_(torch.randn_like(p) * std)
    return conn


def row_col_error(h):
    return max((h.sum(-1) - 1).abs().max().item(), (h.sum(-2) - 1).abs().max().item())


def test_variant_listing_and_unknown_name():
    assert set(kv.CONNECTIONS) == {"residual", "hc", "mhc", "mhclite", "kromhc"}
    with pytest.raises(ValueError, match="'kromhcc'.*residual, hc, mhc, mhclite, kromhc"):
        kv.build_connection("kromhcc", num_streams=4, dim=8)
    with pytest.raises(ValueError, match="'kromhcc'"):
        kv.connection_num_params("kromhcc", 4, 8)


@pytest.mark.parametrize("bad, match", [
    (dict(init="zeros"), "init 'zeros'.*published, identity"),
    (dict(backend="cuda"), "backend 'cuda'.*auto, triton, numba, torch"),
    (dict(num_streams=1), "num_streams >= 2"),
    (dict(layer_index="0"), r"layer_index must be an int, got '0' \(str\)"),  # was a TypeError from '%'
    (dict(layer_index=-1), "layer_index must be >= 0, got -1"),
    (dict(dtype=torch.int32), "dtype must be a floating-point torch.dtype.*got torch.int32"),  # was torch's message
    (dict(dtype="float32"), "dtype must be a floating-point torch.dtype.*got 'float32'"),  # about requires_grad
])
def test_bad_arguments_name_value_and_choices(bad, match):
    args = dict(num_streams=4, dim=8) | bad
    with pytest.raises(ValueError, match=match):
        kv.build_connection("kromhc", **args)


@pytest.mark.parametrize("num_streams", ["4", 0, 2.0])
def test_expand_streams_names_a_bad_stream_count(num_streams):
    """'4' was a TypeError from the comparison, 2.0 one from expand."""
    with pytest.raises(ValueError, match=f"num_streams must be an int >= 1, got {num_streams!r}"):
        kv.expand_streams(torch.randn(2, 8), num_streams)


def test_wrong_stream_shape_is_rejected():
    conn = kv.build_connection("kromhc", num_streams=4, dim=8)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4, 8\).*\(2, 3, 8\)"):
        conn(torch.randn(2, 3, 8), lambda u: u)


def test_expand_reduce_layout():
    x = torch.randn(2, 5, 7)
    X = kv.expand_streams(x, 3)
    assert X.shape == (2, 5, 3, 7) and all(torch.equal(X[..., i, :], x) for i in range(3))
    # a broadcast view, not n copies: the first connection keeps C values per token for its backward, not n*C
    assert X.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() and X.stride(-2) == 0
    torch.testing.assert_close(kv.reduce_streams(X), x)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_agrees_with_coefficients(variant):
    conn = randomize(kv.build_connection(variant, num_streams=4, dim=16, layer_index=3))
    X = torch.randn(2, 5, 4, 16)
    lin = torch.nn.Linear(16, 16)
    h_pre, h_post, h_res = conn.coefficients(X)
    assert h_pre.shape == h_post.shape == (2, 5, 4) and h_res.shape == (2, 5, 4, 4)
    expected = h_res @ X + h_post.unsqueeze(-1) * lin((h_pre.unsqueeze(-2) @ X).squeeze(-2)).unsqueeze(-2)
    torch.testing.assert_close(conn(X, lin), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "numba", "triton"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_batch(variant, backend):
    """No tokens: empty outputs, coefficients and gradients of the right shapes (reshapes spell out sizes)."""
    conn = kv.build_connection(variant, num_streams=4, dim=16, backend=backend)
    X = torch.randn(0, 5, 4, 16, requires_grad=True)
    conn(X, torch.nn.Linear(16, 16)).sum().backward()
    assert X.grad.shape == X.shape and all(p.grad is not None for p in conn.parameters())
    assert [tuple(c.shape) for c in conn.coefficients(X)] == [(0, 5, 4), (0, 5, 4), (0, 5, 4, 4)]


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("variant, n", [("hc", 4), ("mhc", 4), ("mhclite", 3), ("kromhc", 6)])
def test_coefficients_follow_the_parameters(variant, n, backend):
    """The coefficients written out from the parameters, ``X (5, n, 8)`` float64: ``a = [s_pre | s_post | s_res] *
    (RMSNorm(vec X) W) + b`` (each scale on its own slice of ``2n + m``), ``H_pre = sigmoid(a_pre)``,
    ``H_post = 2 sigmoid(a_post)``, ``H_res`` from ``a_res``: HC's ``(n, n)`` row-major, mHC's Sinkhorn of it,
    mHC-lite's Birkhoff mix, KromHC's Kronecker product of its factors' mixes (``(2, 3)``: the first factor's 2 logits
    first). All three equal to 1e-12 (the other tests build their expected values from ``coefficients`` itself)."""
    conn = randomize(kv.build_connection(variant, num_streams=n, dim=8, backend=backend), std=1.0).double()
    with torch.no_grad():
        conn.scale.copy_(torch.tensor([0.5, -1.5, 2.0]))
    X = torch.randn(5, n, 8, dtype=torch.float64)
    flat = X.flatten(-2)
    x = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + conn.eps) * conn.norm_weight
    a = (x @ conn.proj_weight).detach()
    b, s = conn.bias.detach(), conn.scale.detach()
    a_pre, a_post, a_res = s[0] * a[:, :n] + b[:n], s[1] * a[:, n:2 * n] + b[n:2 * n], s[2] * a[:, 2 * n:] + b[2 * n:]
    perms = {k: permutation_matrices(k, dtype=torch.float64) for k in (2, 3)}
    expected_res = {"hc": lambda: a_res.view(5, n, n),
                    "mhc": lambda: sinkhorn_reference(a_res.view(5, n, n), conn.sinkhorn_iters),
                    "mhclite": lambda: birkhoff(a_res, perms[3]),
                    "kromhc": lambda: kronecker([birkhoff(a_res[:, :2], perms[2]), birkhoff(a_res[:, 2:], perms[3])])}
    h_pre, h_post, h_res = conn.coefficients(X)
    for name, got, expected in (("h_pre", h_pre, torch.sigmoid(a_pre)), ("h_post", h_post, 2 * torch.sigmoid(a_post)),
                                ("h_res", h_res, expected_res[variant]())):
        torch.testing.assert_close(got.detach(), expected, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("variant", EXACT)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_exact_double_stochasticity(variant, dtype, tol):
    conn = randomize(kv.build_connection(variant, num_streams=6, dim=8), std=3.0).to(dtype)
    h_res = conn.coefficients(torch.randn(64, 6, 8, dtype=dtype) * 10)[2]
    assert h_res.dtype == dtype and (h_res >= 0).all()
    assert row_col_error(h_res) <= tol


@pytest.mark.parametrize("variant", EXACT)
def test_exact_under_extreme_logits(variant):
    conn = kv.build_connection(variant, num_streams=4, dim=4)
    a_res = (torch.randint(0, 2, (256, conn.num_res_logits(4))) * 2 - 1) * 1e4
    h_res = conn.res_matrix(a_res.float())
    assert torch.isfinite(h_res).all() and row_col_error(h_res) <= 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_coefficients_float32_under_bf16_autocast(variant):
    conn = randomize(kv.build_connection(variant, num_streams=4, dim=16))
    X = torch.randn(3, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h_pre, h_post, h_res = conn.coefficients(X.bfloat16())
        out = conn(X, torch.nn.Linear(16, 16))
    assert h_pre.dtype == h_post.dtype == h_res.dtype == torch.float32
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    if variant in EXACT:
        assert row_col_error(h_res) <= 1e-6


@settings(max_examples=40, deadline=None)
@given(
    variant=st.sampled_from(EXACT),
    n=st.sampled_from([2, 3, 4, 5, 6, 8, 9, 10, 12, 16]),
    dim=st.integers(1, 24),
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_property_shapes_and_double_stochasticity(variant, n, dim, lead, scale, seed):
    if variant == "mhclite" and n > 6:
        return
    torch.manual_seed(seed)
    conn = randomize(kv.build_connection(variant, num_streams=n, dim=dim), std=2.0)
    X = torch.randn(*lead, n, dim) * scale
    out = conn(X, torch.tanh)
    h_pre, h_post, h_res = conn.coefficients(X)
    assert out.shape == X.shape and h_res.shape == (*lead, n, n)
    assert ((h_pre >= 0) & (h_pre <= 1)).all() and ((h_post >= 0) & (h_post <= 2)).all()
    assert (h_res >= 0).all() and row_col_error(h_res) <= 1e-6


@pytest.mark.parametrize("n, factors", [(2, (2,)), (4, (2, 2)), (6, (2, 3)), (8, (2, 2, 2)), (12, (2, 2, 3)), (5, (5,))])
def test_kromhc_factorisation(n, factors):
    conn = kv.build_connection("kromhc", num_streams=n, dim=4)
    assert conn.factors == factors == kronecker_factors(n)
    assert conn.num_res_logits(n) == sum(math.factorial(k) for k in factors)
    assert "factors=" in repr(conn)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_kromhc_of_prime_n_equals_mhclite(n):
    a_res = torch.randn(7, math.factorial(n))
    krom = kv.build_connection("kromhc", num_streams=n, dim=4)
    lite = kv.build_connection("mhclite", num_streams=n, dim=4)
    torch.testing.assert_close(krom.res_matrix(a_res), lite.res_matrix(a_res))


@pytest.mark.parametrize("variant, n", [("mhclite", 3), ("mhclite", 4), ("kromhc", 4), ("kromhc", 6), ("kromhc", 8)])
@pytest.mark.parametrize("logits", ["init", "unit", "large"])
def test_exact_maps_in_float32_are_off_only_by_rounding_their_entries(variant, n, logits):
    """Each float32 entry is its exact value rounded once per factor and product: a row or column,
    summed exactly (float64), is 1 within (2K - 1) 2^-24 for K Kronecker factors (mHC-lite: K = 1)."""
    conn = kv.build_connection(variant, num_streams=n, dim=4)
    K = len(getattr(conn, "factors", (n,)))
    noise = torch.randn(20000, conn.num_res_logits(n))
    a_res = {"init": conn.res_bias() + 0.5 * noise, "unit": noise, "large": 100 * noise}[logits]
    H = conn.res_matrix(a_res).double()
    bound = 1.01 * (2 * K - 1) * 2.0 ** -24
    assert (H.sum(-1) - 1).abs().max() <= bound and (H.sum(-2) - 1).abs().max() <= bound


def test_kronecker_applies_factors_axis_by_axis():
    """(U (x) V) X equals applying U along the first and V along the second stream axis of X (i1, i2, C)."""
    U = birkhoff(torch.randn(5, 2), permutation_matrices(2))
    V = birkhoff(torch.randn(5, 6), permutation_matrices(3))
    X = torch.randn(5, 6, 7)
    axis_by_axis = torch.einsum("tac,tbd,tcdk->tabk", U, V, X.view(5, 2, 3, 7)).reshape(5, 6, 7)
    torch.testing.assert_close(kronecker([U, V]) @ X, axis_by_axis)


def test_permutation_limit_points_to_kromhc():
    with pytest.raises(ValueError, match=r"7! = 5040.*'kromhc'"):
        kv.build_connection("mhclite", num_streams=7, dim=8)
    with pytest.raises(ValueError, match=r"7! = 5040"):
        kv.build_connection("kromhc", num_streams=14, dim=8)
    with pytest.raises(ValueError, match=r"7! = 5040"):
        kv.connection_num_params("mhclite", 7, 8)


def test_mhc_sinkhorn_is_approximate_and_stable():
    logits = torch.randn(512, 4, 4) * 4
    errors = [row_col_error(sinkhorn_reference(logits, t)) for t in (1, 5, 20)]
    assert errors[0] > errors[1] > errors[2] > 0
    extreme = (torch.randint(0, 2, (512, 4, 4)) * 2 - 1).float() * 1e4
    assert torch.isfinite(sinkhorn_reference(extreme, 20)).all()
    conn = randomize(kv.build_connection("mhc", num_streams=4, dim=8, sinkhorn_iters=3), std=3.0)
    assert conn.sinkhorn_iters == 3 and "sinkhorn_iters=3" in repr(conn)
    X = torch.randn(64, 4, 8)
    few = conn.stochasticity_error(X).item()
    conn.sinkhorn_iters = 50
    assert 0 < conn.stochasticity_error(X).item() < few
    with pytest.raises(ValueError, match="sinkhorn_iters must be >= 1, got 0"):
        kv.build_connection("mhc", num_streams=4, dim=8, sinkhorn_iters=0)


@pytest.mark.parametrize("variant", ["residual", *VARIANTS])
@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_parameter_counts(variant, n):
    n = 1 if variant == "residual" else n
    dim = 24
    conn = kv.build_connection(variant, num_streams=n, dim=dim)
    assert sum(p.numel() for p in conn.parameters()) == kv.connection_num_params(variant, n, dim)


def test_parameter_complexity_matches_spec():
    C = 768
    count = kv.connection_num_params
    for n in (4, 8, 16):  # HC and mHC: Theta(n^3 C)
        assert n**3 * C <= count("hc", n, C) == count("mhc", n, C) <= 2 * (n**3 + 3 * n**2) * C
    for n in (4, 8, 16):  # KromHC: O(n^2 C), 2 log2(n) residual logits for powers of two
        assert kv.KromHC.num_res_logits(n) == 2 * int(math.log2(n))
        assert count("kromhc", n, C) <= 4 * n**2 * C
    for n in (3, 4, 5, 6):  # mHC-lite: Theta(n! n C)
        assert math.factorial(n) * n * C <= count("mhclite", n, C) <= (math.factorial(n) + 2 * n + 1) * n * C + 1000
    assert count("mhclite", 6, C) > 10 * count("kromhc", 6, C)


@pytest.mark.parametrize("variant", VARIANTS)
def test_published_init(variant):
    n, conn = 4, kv.build_connection(variant, num_streams=4, dim=8, layer_index=6)
    h_pre, h_post, h_res = conn.coefficients(torch.randn(3, n, 8))
    favoured = 6 % n
    assert torch.allclose(h_pre[..., favoured], torch.sigmoid(torch.tensor(1.0)))
    assert torch.allclose(h_post[..., 1 - favoured if favoured else 1], 2 * torch.sigmoid(torch.tensor(-1.0)))
    assert (h_res.diagonal(dim1=-2, dim2=-1) > 0.95).all()
    assert (conn.proj_weight == 0).all() and torch.allclose(conn.scale, torch.full((3,), 0.01))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [2, 4])
def test_identity_init_stack_equals_residual_network(variant, n):
    """H_pre = 1/n, H_post = 1, H_res ~ I: a stack computes exactly x <- x + F(x)."""
    dim, depth = 32, 6
    branches = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim), torch.nn.GELU(), torch.nn.Linear(dim, dim))
        for _ in range(2 * depth)
    )
    conns = [kv.build_connection(variant, num_streams=n, dim=dim, layer_index=i, init="identity") for i in range(2 * depth)]
    x = torch.randn(4, 9, dim)
    ref = x
    for f in branches:
        ref = ref + f(ref)
    X = kv.expand_streams(x, n)
    for conn, f in zip(conns, branches):
        X = conn(X, f)
    out = kv.reduce_streams(X)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-3
    h_pre, h_post, _ = conns[0].coefficients(X)
    torch.testing.assert_close(h_pre, torch.full_like(h_pre, 1 / n))
    torch.testing.assert_close(h_post, torch.ones_like(h_post))


def test_residual_connection():
    x = torch.randn(2, 3, 8)
    conn = kv.build_connection("residual", num_streams=1, dim=8)
    lin = torch.nn.Linear(8, 8)
    torch.testing.assert_close(kv.reduce_streams(conn(kv.expand_streams(x, 1), lin)), x + lin(x))
    assert kv.connection_num_params("residual", 1, 8) == 0
    with pytest.raises(ValueError, match="exactly 1 stream, got num_streams=4"):
        kv.build_connection("residual", num_streams=4, dim=8)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_finite_gradient(variant):
    conn = randomize(kv.build_connection(variant, num_streams=4, dim=16), std=0.1)
    lin = torch.nn.Linear(16, 16)
    conn(torch.randn(2, 5, 4, 16), lin).square().mean().backward()
    for name, p in conn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant, n", [("hc", 3), ("mhc", 3), ("mhclite", 3), ("kromhc", 4), ("kromhc", 6)])
def test_gradcheck_float64(variant, n):
    kwargs = {"sinkhorn_iters": 4} if variant == "mhc" else {}
    conn = randomize(kv.build_connection(variant, num_streams=n, dim=3, **kwargs), std=0.3).double()
    names = [name for name, _ in conn.named_parameters()]
    W = torch.randn(3, 3, dtype=torch.float64)

    def fn(X, *params):
        return torch.func.functional_call(conn, dict(zip(names, params)), (X, lambda u: torch.tanh(u @ W)))

    X = torch.randn(2, n, 3, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in conn.parameters()]
    assert torch.autograd.gradcheck(fn, (X, *params))


def test_float64_and_bf16_streams():
    conn = randomize(kv.build_connection("kromhc", num_streams=4, dim=8))
    X = torch.randn(2, 4, 8)
    out64 = conn.double()(X.double(), torch.sin)
    out32 = conn.float()(X, torch.sin)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, rtol=1e-5, atol=1e-5)
    out16 = conn(X.bfloat16(), torch.sin)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("variant, backend", [("kromhc", None), ("mhc", "torch")])  # mhc/torch: PyTorch's Sinkhorn
def test_torch_compile_matches_eager(variant, backend):
    conn = randomize(kv.build_connection(variant, num_streams=4, dim=16, backend=backend))
    lin = torch.nn.Linear(16, 16)
    X = torch.randn(2, 5, 4, 16, requires_grad=True)
    compiled = torch.compile(conn, fullgraph=True)
    out, ref = compiled(X, lin), conn(X, lin)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [X, *conn.parameters()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [X, *conn.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant, args, match", [
    ("kromhc", dict(num_streams="4"), r"'kromhc' cannot take num_streams='4': num_streams must be an int, got str"),
    ("hc", dict(num_streams=4.0), r"cannot take num_streams=4.0: num_streams must be an int, got float"),
    ("mhc", dict(num_streams=True), r"num_streams must be an int, got bool"),
    ("hc", dict(dim=-5), r"dim must be >= 1, got -5"),
    ("residual", dict(num_streams=1, dim=-1), r"dim must be >= 1, got -1"),
    ("residual", dict(num_streams=1, init="foo"), r"unknown init 'foo'; valid choices: published, identity"),
    ("mhc", dict(sinkhorn_iters=2.5), r"sinkhorn_iters must be an int, got 2.5"),
    ("kromhc", dict(sinkhorn_iters=3), r"keyword arguments \{'sinkhorn_iters': 3\} not accepted by the 'kromhc' "
                                       r"connection: unknown 'sinkhorn_iters'; valid: none"),
])
def test_one_validation_for_constructor_and_parameter_count(variant, args, match):
    """The constructor and connection_num_params run the same check, with the same message."""
    args = dict(num_streams=4, dim=8) | args
    with pytest.raises(ValueError, match=match):
        kv.build_connection(variant, **args)
    if set(args) <= {"num_streams", "dim"}:
        with pytest.raises(ValueError, match=match):
            kv.connection_num_params(variant, args["num_streams"], args["dim"])


def test_integer_stream_state_is_rejected_by_name():
    conn = kv.build_connection("hc", num_streams=4, dim=8)
    with pytest.raises(ValueError, match="floating-point stream state, got dtype torch.int64"):
        conn(torch.ones(2, 4, 8, dtype=torch.int64), lambda u: u)


def test_branch_of_the_wrong_width_is_named():
    conn = kv.build_connection("kromhc", num_streams=4, dim=8)
    with pytest.raises(ValueError, match=r"branch of KromHC returned shape \(2, 5\); it must return .*\(2, 8\)"):
        conn(torch.randn(2, 4, 8), lambda u: u[..., :5])


@pytest.mark.parametrize("variant", VARIANTS)
def test_stochasticity_error_of_no_tokens_is_zero(variant):
    """A batch of no tokens has no row or column off 1 (was amax's error on an empty tensor)."""
    conn = kv.build_connection(variant, num_streams=4, dim=8)
    assert conn.stochasticity_error(torch.randn(0, 4, 8)).item() == 0
    assert kv.stochasticity_error(torch.empty(0, 3, 3)).item() == 0


def test_a_connection_needs_a_width():
    """dim=None (which check() takes, to skip the width) was a TypeError from the parameter shapes / the count."""
    with pytest.raises(ValueError, match="dim must be an int >= 1.*got None"):
        kv.build_connection("kromhc", num_streams=4, dim=None)
    with pytest.raises(ValueError, match="dim must be an int >= 1.*got None"):
        kv.connection_num_params("hc", 4, None)


def test_residual_connection_refuses_what_the_others_refuse():
    """A wrong stream axis or width, an integer state, a branch of another shape (X + y broadcast them silently:
    (4, 8) streams became (4, 4, 8)) and an unknown option (a TypeError) are ValueErrors naming the value."""
    conn = kv.build_connection("residual", num_streams=1, dim=8)
    with pytest.raises(ValueError, match=r"\(\.\.\., 1, 8\), got \(4, 8\)"):
        conn(torch.randn(4, 8), lambda u: u)
    with pytest.raises(ValueError, match=r"\(\.\.\., 1, 8\), got \(2, 1, 5\)"):
        conn(torch.randn(2, 1, 5), lambda u: u)
    with pytest.raises(ValueError, match="floating-point stream state, got dtype torch.int64"):
        conn(torch.ones(2, 1, 8, dtype=torch.int64), lambda u: u)
    for bad in (lambda u: u[0], lambda u: u[:, :1]):
        with pytest.raises(ValueError, match=r"branch of ResidualConnection returned shape .*must return .*\(2, 8\)"):
            conn(torch.randn(2, 1, 8), bad)
    with pytest.raises(ValueError, match=r"\{'sinkhorn_iters': 3\} not accepted by the 'residual' connection"):
        kv.build_connection("residual", num_streams=1, dim=8, sinkhorn_iters=3)


@pytest.mark.parametrize("variant, n", [("hc", 3), ("mhclite", 3), ("kromhc", 8)])
def test_identity_init_in_float64_equals_residual_to_float64_rounding(variant, n):
    """b_pre = -log(n - 1) was rounded to float32 before the float64 parameters took it: H_pre = 1/n to 3e-8 only,
    and the stack off its residual counterpart by 1e-9 .. 1e-7."""
    torch.manual_seed(0)
    weights = [torch.randn(6, 6, dtype=torch.float64) * 0.5 for _ in range(4)]
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    ref, X = x, kv.expand_streams(x, n)
    for i, w in enumerate(weights):
        ref = ref + torch.tanh(ref @ w)
        conn = kv.build_connection(variant, n, 6, i, init="identity", dtype=torch.float64, backend="torch")
        X = conn(X, lambda u, w=w: torch.tanh(u @ w))
    assert (kv.reduce_streams(X) - ref).abs().max().item() < 1e-12
    torch.testing.assert_close(conn.coefficients(X)[0], torch.full((3, 5, n), 1 / n, dtype=torch.float64),
                               rtol=1e-15, atol=0)
