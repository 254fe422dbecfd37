"""mHC's Sinkhorn on the PyTorch backend: the reference's iterations with the tokens on the last axis.

Reference: :func:`kromhc_vision.ops.reference.sinkhorn`.
"""
import torch

from ...residual_maps import tokens_first, tokens_last


def _iterate(L: torch.Tensor, num_iters: int, keep: bool = False):
    """``num_iters`` row-then-column ``log_softmax`` half-steps on ``L (n, n, T)``: the last iterate, or with
    ``keep`` all ``2 num_iters + 1`` (the input first)."""
    iterates = [L]
    for _ in range(num_iters):
        for dim in (1, 0):
            L = torch.log_softmax(L, dim=dim)
            if keep:
                iterates.append(L)
    return iterates if keep else L


def _forward(logits: torch.Tensor, num_iters: int) -> torch.Tensor:
    """``H_res = exp(L)`` after the iterations, in the logits' layout ``(..., n, n)``."""
    return tokens_first(_iterate(tokens_last(logits, 2), num_iters).exp(), logits.shape[:-2])


class Sinkhorn(torch.autograd.Function):
    """Saves the logits alone (``n^2`` values per token) and runs the iterations again in the backward, where plain
    autograd would keep all ``2 num_iters + 1`` iterates (41 ``(n, n)`` per token at 20 iterations: at n = 4 about
    as much as the stream state, per connection). The backward of ``y = log_softmax(x)`` along a dim is
    ``dx = dy - exp(y) sum(dy)``, applied from the last half-step to the first; it is made of differentiable ops,
    so double backward works (as on the plain path it replaces)."""

    @staticmethod
    def forward(ctx, logits, num_iters):
        ctx.save_for_backward(logits)
        ctx.num_iters = num_iters
        return _forward(logits, num_iters)

    @staticmethod
    def backward(ctx, grad):
        logits, = ctx.saved_tensors
        iterates = _iterate(tokens_last(logits, 2), ctx.num_iters, keep=True)
        g = tokens_last(grad, 2) * iterates[-1].exp()  # through H = exp(L)
        for i in range(len(iterates) - 1, 0, -1):  # iterate i came from i - 1 along dim 1 (i odd) or 0 (i even)
            y = iterates[i]
            g = g - y.exp() * g.sum(dim=1 if i % 2 else 0, keepdim=True)
            iterates[i] = None  # released as the loop goes
        return tokens_first(g, logits.shape[:-2]), None


def sinkhorn(logits: torch.Tensor, num_iters: int) -> torch.Tensor:
    """mHC: Sinkhorn-Knopp on ``exp(logits)`` in log domain, ``(..., n, n) -> (..., n, n)``.

    Each iteration normalises rows then columns: ``L = log_softmax(L, rows)``,
    ``L = log_softmax(L, columns)`` (i.e. ``L -= logsumexp(L)`` along each). The result's columns
    sum to 1 to rounding; its rows only approximately (the error shrinks with ``num_iters`` but is
    not zero). Where autograd records the call, :class:`Sinkhorn` keeps only the logits for the backward
    (torch.compile traces it as it traces the backend's other Functions); elsewhere the iterations alone.
    """
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return _forward(logits, num_iters)
    return Sinkhorn.apply(logits, num_iters)
