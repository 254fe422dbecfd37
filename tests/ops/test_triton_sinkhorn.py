"""Triton log-domain Sinkhorn against :func:`kromhc_vision.ops.reference.sinkhorn` differentiated by autograd through the iterations."""
import pytest
import torch

from kromhc_vision.ops.triton import sinkhorn
from kromhc_vision.ops.reference import sinkhorn as sinkhorn_reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, iters, lead", [(2, 1, (33,)), (3, 5, (2, 4)), (4, 20, (3, 5)), (6, 7, (5,)),
                                            (8, 20, (2, 2)), (16, 3, (3,))])
def test_matches_reference(n, iters, lead, dtype, compare):
    logits = (2 * torch.randn(*lead, n, n, dtype=dtype)).requires_grad_()
    compare(sinkhorn, sinkhorn_reference, [logits], (iters,))


def test_saturated_logits_and_column_sums(compare):
    """The published init (0 on the diagonal, -8 elsewhere) plus large logits stay finite and exact."""
    logits = -8.0 * (1 - torch.eye(4, dtype=torch.float64)) + torch.randn(6, 4, 4, dtype=torch.float64)
    logits[0] *= 10
    logits.requires_grad_()
    compare(sinkhorn, sinkhorn_reference, [logits], (20,))
    torch.testing.assert_close(sinkhorn(logits, 20).sum(-2), torch.ones(6, 4, dtype=torch.float64))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy on NaN and inf: what is tested
@pytest.mark.parametrize("n", [3, 4])  # 3: a padded block (4 x 4)
def test_non_finite_logits_give_what_the_reference_gives(n):
    """A NaN or +inf logit, or a token of -inf logits, makes that token's ``H_res`` and gradient NaN, as in the
    reference (``log_softmax``); a -inf logit among finite ones is an exact 0; other tokens are untouched. (The
    guards of the padding caught valid rows too: a NaN token came out finite.)"""
    logits = torch.randn(5, n, n, dtype=torch.float64)
    logits[1, 0, 1], logits[2, 1, 2], logits[3], logits[4, 2, 0] = (float("nan"), float("inf"), float("-inf"),
                                                                     float("-inf"))
    logits.requires_grad_()
    dout = torch.randn(5, n, n, dtype=torch.float64)
    got = sinkhorn(logits, 3)
    expected = sinkhorn_reference(logits, 3)
    (dgot,), (dexpected,) = (torch.autograd.grad(out, logits, dout) for out in (got, expected))
    for g, e in ((got, expected), (dgot, dexpected)):
        assert torch.equal(g.isnan(), e.isnan())
        assert g[1:4].isnan().all() and not g[[0, 4]].isnan().any()
        torch.testing.assert_close(g[[0, 4]], e[[0, 4]])
    assert got[4, 2, 0] == 0


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n <= 16"):
        sinkhorn(torch.randn(2, 17, 17), 3)
    with pytest.raises(ValueError, match=r"\(\.\.\., n, n\)"):
        sinkhorn(torch.randn(2, 3, 4), 3)


def test_opcheck():
    logits = torch.randn(5, 3, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.kromhc_vision.sinkhorn_fwd.default, (logits, 4))
    torch.library.opcheck(torch.ops.kromhc_vision.sinkhorn_bwd.default, (logits.detach(), torch.randn(5, 3, 3), 4))
