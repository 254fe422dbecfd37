"""mHC's Sinkhorn on the PyTorch backend: the reference's iterations with the tokens on the last axis.

Reference: :func:`kromhc_vision.ops.reference.sinkhorn`.
"""
import torch

from ...residual_maps import tokens_first, tokens_last


def sinkhorn(logits: torch.Tensor, num_iters: int) -> torch.Tensor:
    """mHC: Sinkhorn-Knopp on ``exp(logits)`` in log domain, ``(..., n, n) -> (..., n, n)``.

    Each iteration normalises rows then columns: ``L = log_softmax(L, rows)``,
    ``L = log_softmax(L, columns)`` (i.e. ``L -= logsumexp(L)`` along each). The result's columns
    sum to 1 to rounding; its rows only approximately (the error shrinks with ``num_iters`` but is
    not zero). Autograd keeps one ``(n, n, T)`` tensor per half-step.
    """
    L = tokens_last(logits, 2)
    for _ in range(num_iters):
        L = torch.log_softmax(L, dim=1)
        L = torch.log_softmax(L, dim=0)
    return tokens_first(L.exp(), logits.shape[:-2])
