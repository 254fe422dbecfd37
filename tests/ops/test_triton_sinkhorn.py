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


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n <= 16"):
        sinkhorn(torch.randn(2, 17, 17), 3)
    with pytest.raises(ValueError, match=r"\(\.\.\., n, n\)"):
        sinkhorn(torch.randn(2, 3, 4), 3)


def test_opcheck():
    logits = torch.randn(5, 3, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.kromhc_vision.sinkhorn_fwd.default, (logits, 4))
    torch.library.opcheck(torch.ops.kromhc_vision.sinkhorn_bwd.default, (logits.detach(), torch.randn(5, 3, 3), 4))
