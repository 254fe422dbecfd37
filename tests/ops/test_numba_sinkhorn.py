"""numba Sinkhorn against :func:`kromhc_vision.ops.reference.sinkhorn` differentiated by autograd through the iterations,
on both of its paths: linear domain (logit span <= SPAN_LIMIT) and log domain (wider spans)."""
import sys

import numba
import numpy as np
import pytest
import torch

from kromhc_vision.ops.numba import sinkhorn
from kromhc_vision.ops.reference import sinkhorn as sinkhorn_reference

KERNELS = sys.modules["kromhc_vision.ops.numba.sinkhorn"]
SPAN_LIMIT = KERNELS.SPAN_LIMIT


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, iters, lead", [(2, 1, (33,)), (3, 5, (2, 4)), (4, 20, (3, 5)), (6, 7, (5,)),
                                            (8, 20, (2, 2)), (16, 3, (3,)), (4, 20, (300,))])
def test_matches_reference(n, iters, lead, dtype, compare):
    logits = (2 * torch.randn(*lead, n, n, dtype=dtype)).requires_grad_()
    compare(sinkhorn, sinkhorn_reference, [logits], (iters,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("offset", [-1, 1, 2e4])
def test_wide_spans(dtype, offset, compare):
    """Near the dtype's span limit the linear path is still exact; beyond it (the spec's ±1e4 logits
    included) a group of tokens holding one wide token runs in the log domain. Both match the
    reference and stay finite; the columns sum to 1."""
    span = SPAN_LIMIT[dtype] + offset
    logits = torch.randn(200, 4, 4, dtype=dtype)
    logits[7] = 0
    logits[7, 0, 1] = -span  # token 7 spans exactly `span`; the others of its task (0-127) far less
    P, _, _, acc, _ = KERNELS._scratch(4, 20, logits.numpy().dtype)
    assert KERNELS._task_start(logits.numpy(), 0, 128, SPAN_LIMIT[dtype], KERNELS._rows(P, 16), acc) == (offset > 0)
    logits[150] = torch.tensor([[1, -1, 0, 0.5], [0, -1, 1, 0], [0, 0, 0, 0], [-1, -1, -1, 1]]) * span / 2
    logits.requires_grad_()
    compare(sinkhorn, sinkhorn_reference, [logits], (20,))
    out = sinkhorn(logits, 20)
    assert out.isfinite().all()
    torch.testing.assert_close(out.sum(-2), torch.ones(200, 4, dtype=dtype))


def test_saturated_logits(compare):
    """The published init (0 on the diagonal, -8 elsewhere) plus large logits."""
    logits = -8.0 * (1 - torch.eye(4, dtype=torch.float64)) + torch.randn(6, 4, 4, dtype=torch.float64)
    logits[0] *= 10
    logits.requires_grad_()
    compare(sinkhorn, sinkhorn_reference, [logits], (20,))


def test_gradcheck():
    logits = torch.randn(3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, 5), (logits,))


def test_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(\.\.\., n, n\)"):
        sinkhorn(torch.randn(2, 3, 4), 3)
    with pytest.raises(ValueError, match="num_iters must be >= 1, got 0"):
        sinkhorn(torch.randn(2, 3, 3), 0)


def test_opcheck():
    logits = torch.randn(5, 3, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.kromhc_vision.cpu_sinkhorn_fwd.default, (logits, 4))
    torch.library.opcheck(torch.ops.kromhc_vision.cpu_sinkhorn_bwd.default, (logits.detach(), 4, torch.randn(5, 3, 3)))


def _unrolled(n):
    """The unrolled iterations and walk back for ``n`` streams, called from a kernel as the package's kernels do."""
    iterations, walk_back = KERNELS.unrolled_iterations, KERNELS.unrolled_walk_back

    @numba.njit
    def run_iterations(P, m, _, num_iters, sums, acc):
        iterations(P, m, n, num_iters, sums, acc)

    @numba.njit
    def run_walk_back(P, G, m, _, num_iters, sums, acc, inv):
        walk_back(P, G, m, n, num_iters, sums, acc, inv)

    return run_iterations, run_walk_back


# every unrolled n in float32, float64 at n = 4 (each case compiles its own kernels: seconds in a fresh clone)
@pytest.mark.parametrize("n, dtype", [(n, np.float32) for n in range(2, KERNELS.UNROLLED_MAX_STREAMS + 1)]
                         + [(4, np.float64)])
def test_unrolled_iterations_are_the_by_row_ones_bitwise(n, dtype):
    """The linear domain's two implementations (one pass per iteration with a token's entries in registers, up to
    UNROLLED_MAX_STREAMS; one pass per row or column above) run the same operations in the same order: the
    iterates, the kept sums and the walked-back gradients agree bit for bit, here on a partial task (m < 128)."""
    rng = np.random.default_rng(n)
    m, iters, chunk = 100, 7, KERNELS._CHUNK
    start = rng.uniform(0.01, 1.0, n * n * chunk).astype(dtype)
    grad = rng.standard_normal(n * n * chunk).astype(dtype)
    results = []
    for iterations, walk_back in (_unrolled(n), (KERNELS._iterations_by_row, KERNELS._walk_back_by_row)):
        P, G = start.copy(), grad.copy()
        sums, acc, inv = np.zeros(2 * iters * n * chunk, dtype), np.empty(chunk, dtype), np.empty(chunk, dtype)
        iterations(P, m, n, iters, sums, acc)
        last = P.copy()
        walk_back(P, G, m, n, iters, sums, acc, inv)
        rows = lambda a, r: a.reshape(r, chunk)[:, :m]  # noqa: E731 (the task's tokens only)
        results.append((rows(last, n * n), rows(sums, 2 * iters * n), rows(P, n * n), rows(G, n * n)))
    for unrolled, by_row in zip(*results):
        np.testing.assert_array_equal(unrolled, by_row)
    np.testing.assert_allclose(results[0][2], rows(start, n * n), rtol=1e-4)  # the walk back rebuilt P_0
