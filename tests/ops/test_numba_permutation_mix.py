"""numba ``permutation_mix`` (mHC-lite's and KromHC's ``H_res``) against
:func:`kromhc_vision.residual_maps.kronecker_birkhoff` differentiated by autograd, for every factorisation shape."""
import functools
import math

import numba
import numpy as np
import pytest
import torch

from kromhc_vision.ops import dispatch
from kromhc_vision.ops.numba import _exp, permutation_mix
from kromhc_vision.permutations import permutation_matrices
from kromhc_vision.residual_maps import kronecker_birkhoff, stochasticity_error

FACTORS = [(2,), (3,), (4,), (5,), (2, 2), (2, 3), (3, 2), (2, 2, 2), (3, 3), (2, 2, 3)]


def logits_for(factors, lead, dtype, spread=2.0):
    m = sum(math.factorial(k) for k in factors)
    return (spread * torch.randn(*lead, m, dtype=dtype)).requires_grad_()


@pytest.mark.parametrize("lead", [(3, 7), (5, 23)])  # one partial block of 32 tokens; four, the last partial
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("factors", FACTORS)
def test_matches_reference(factors, dtype, lead, compare):
    perms = [permutation_matrices(k, dtype=dtype) for k in factors]
    compare(permutation_mix, kronecker_birkhoff, [logits_for(factors, lead, dtype)], (perms,))


@pytest.mark.parametrize("factors", [(4,), (2, 2, 2), (2, 3)])
def test_doubly_stochastic_to_rounding(factors):
    """Each entry rounded once from float64 sums: rows and columns sum to 1 within n float32 roundings, also
    for saturated logits (the published init's -8 plus large values)."""
    logits = logits_for(factors, (500,), torch.float32, spread=30.0)
    H = permutation_mix(logits, [permutation_matrices(k) for k in factors])
    n = math.prod(factors)
    assert stochasticity_error(H) <= n * 2 ** -24


@functools.lru_cache(maxsize=None)
def _exp_loop():
    """``exp(x, out)``: the kernels' ``exp`` over an array (compiled once, kept for the session)."""
    scalar_exp = _exp.exp_nonpositive

    @numba.njit
    def exp(x, out):
        for i in range(x.size):
            out[i] = scalar_exp(x[i])

    return exp


def test_exp_within_an_ulp_of_libm():
    """The kernels' polynomial ``exp`` on ``x <= 0`` (the softmaxes' shifted logits): within one ulp of NumPy's
    ``exp`` from 0 down to ``EXP_MIN``, 0 below it and for -inf, NaN for NaN."""
    exp = _exp_loop()
    x = np.concatenate([-np.logspace(-320, math.log10(-_exp.EXP_MIN), 40001),
                        np.linspace(_exp.EXP_MIN, 0.0, 40001), [0.0, -0.0, -1e-310]])
    got, want = np.empty_like(x), np.exp(x)
    exp(x, got)
    assert np.all(np.abs(got - want) <= np.spacing(want)), np.max(np.abs(got - want) / np.spacing(want))
    special = np.array([_exp.EXP_MIN - 1e-9, -745.2, -1e300, -np.inf, np.nan])
    out = np.empty_like(special)
    exp(special, out)
    assert np.array_equal(out[:4], np.zeros(4)) and np.isnan(out[4])


@pytest.mark.parametrize("factors", [(4,), (2, 3)])
def test_non_finite_logits_give_what_the_reference_gives(factors):
    """A NaN or +inf logit makes its token's ``H`` NaN, as in the reference; and every logit -inf (0 / 0)."""
    perms = [permutation_matrices(k) for k in factors]
    logits = torch.randn(4, sum(math.factorial(k) for k in factors))
    logits[1, 0], logits[2, 1], logits[3] = float("nan"), float("inf"), float("-inf")
    expected, got = kronecker_birkhoff(logits, perms), permutation_mix(logits, perms)
    assert torch.equal(got.isnan(), expected.isnan()) and got.isnan()[1:].all() and not got[0].isnan().any()
    torch.testing.assert_close(got[0], expected[0])


def test_gradcheck():
    for factors in [(3,), (2, 3)]:
        perms = [permutation_matrices(k, dtype=torch.float64) for k in factors]
        assert torch.autograd.gradcheck(lambda x: permutation_mix(x, perms), (logits_for(factors, (2, 3),
                                                                                         torch.float64),))


def test_opcheck():
    logits = torch.randn(5, 8, requires_grad=True)  # KromHC n = 6: 2! + 3!
    torch.library.opcheck(torch.ops.kromhc_vision.cpu_permutation_mix_fwd.default, (logits, [2, 3]))
    torch.library.opcheck(torch.ops.kromhc_vision.cpu_permutation_mix_bwd.default,
                          (logits.detach(), [2, 3], torch.randn(5, 6, 6)))


def test_backward_keeps_only_the_logits():
    """The backward forms the softmax weights again from the logits (the connection keeps them anyway), so
    that ``H_res`` with what its map saves fits recomputation's keep rule (mHC-lite at n = 4: 16 values per token,
    not 16 + 24 float64 weights)."""
    logits = logits_for((4,), (6,), torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        permutation_mix(logits, [permutation_matrices(4)])
    assert len(saved) == 1 and saved[0] is logits


@pytest.mark.parametrize("factors", [(2,), (3,), (4,), (5,), (6,), (2, 2, 2), (2, 3), (2, 5)])
def test_auto_runs_numba_for_every_factorisation(factors):
    """mHC-lite up to n = 6 (720 logits: its vectorised softmax beats PyTorch's, BENCHMARKS.md
    ``permutation_mix_blocked``) and KromHC's products run the kernel under 'auto', as under 'numba'."""
    n = math.prod(factors)
    assert dispatch.backend_for("auto", torch.device("cpu"), "permutation_mix", n) == "numba"
    assert dispatch.backend_for("numba", torch.device("cpu"), "permutation_mix", n) == "numba"
