"""numba ``permutation_mix`` (mHC-lite's and KromHC's ``H_res``) against
:func:`kromhc_vision.residual_maps.kronecker_birkhoff` differentiated by autograd, for every factorisation shape."""
import math

import pytest
import torch

from kromhc_vision.ops import dispatch
from kromhc_vision.ops.numba import permutation_mix
from kromhc_vision.permutations import permutation_matrices
from kromhc_vision.residual_maps import kronecker_birkhoff, stochasticity_error

FACTORS = [(2,), (3,), (4,), (5,), (2, 2), (2, 3), (3, 2), (2, 2, 2), (3, 3), (2, 2, 3)]


def logits_for(factors, lead, dtype, spread=2.0):
    m = sum(math.factorial(k) for k in factors)
    return (spread * torch.randn(*lead, m, dtype=dtype)).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("factors", FACTORS)
def test_matches_reference(factors, dtype, compare):
    perms = [permutation_matrices(k, dtype=dtype) for k in factors]
    compare(permutation_mix, kronecker_birkhoff, [logits_for(factors, (3, 7), dtype)], (perms,))


@pytest.mark.parametrize("factors", [(4,), (2, 2, 2), (2, 3)])
def test_doubly_stochastic_to_rounding(factors):
    """Each entry rounded once from float64 sums: rows and columns sum to 1 within n float32 roundings, also
    for saturated logits (the published init's -8 plus large values)."""
    logits = logits_for(factors, (500,), torch.float32, spread=30.0)
    H = permutation_mix(logits, [permutation_matrices(k) for k in factors])
    n = math.prod(factors)
    assert stochasticity_error(H) <= n * 2 ** -24


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


@pytest.mark.parametrize("factors, expected", [((2,), "numba"), ((3,), "numba"), ((4,), "numba"), ((5,), "torch"),
                                                ((6,), "torch"), ((2, 2, 2), "numba"), ((2, 3), "numba"),
                                                ((2, 5), "numba")])
def test_auto_runs_numba_except_for_large_single_factors(factors, expected):
    """mHC-lite at n = 5, 6 (120, 720 logits) stays with PyTorch's softmax under 'auto'; mHC-lite up to n = 4 and
    KromHC's products run the kernel; 'numba' runs it always."""
    n = math.prod(factors)
    assert dispatch.backend_for("auto", torch.device("cpu"), "permutation_mix", n, len(factors)) == expected
    assert dispatch.backend_for("numba", torch.device("cpu"), "permutation_mix", n, len(factors)) == "numba"
