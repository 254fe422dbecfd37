"""``once_differentiable`` for the PyTorch path's autograd Functions, with a named error on double backward.

Their backwards are hand-written and not themselves differentiated: a gradient they return under
``create_graph=True`` (a gradient penalty, a Hessian-vector product) cannot be differentiated again.
torch's own decorator then fails with a generic message, or with "element 0 of tensors does not require
grad" when the incoming gradient does not require grad; here the second backward raises
:class:`DoubleBackwardUnsupportedError`, which says where and what computes the same values with plain
autograd (:mod:`kromhc_vision.ops.reference`, which supports double backward).
"""
import functools

import torch

__all__ = ["DoubleBackwardUnsupportedError", "once_differentiable"]


class DoubleBackwardUnsupportedError(RuntimeError):
    """A second backward through a hand-written backward of the PyTorch/numba path (``once_differentiable``)."""


def _message(op: str) -> str:
    return (f"double backward through {op} is not supported: its backward on the PyTorch/numba path "
            "(hc_backend 'torch', 'numba', or 'auto' on CPU) is hand-written and once_differentiable, so the "
            "gradients it returns under create_graph=True cannot be differentiated again (gradient penalties, "
            "Hessian-vector products). kromhc_vision.ops.reference computes the same op with plain autograd, which "
            "supports double backward; the connections (hc_backend) do not use it.")


class _Refuse(torch.autograd.Function):
    """Identity on a gradient; differentiating it raises :class:`DoubleBackwardUnsupportedError`."""

    @staticmethod
    def forward(ctx, grad, anchor, op):
        ctx.op = op
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _):
        raise DoubleBackwardUnsupportedError(_message(ctx.op))


def once_differentiable(op: str):
    """Decorate ``backward`` of the autograd Function for ``op``: run it without grad; under
    ``create_graph=True`` (grad mode on) mark its tensor outputs so that their backward raises."""
    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():  # the usual backward pass (no create_graph): no context to enter
                return backward(ctx, *grads)
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not any(ctx.needs_input_grad):
                return outputs
            anchor = torch.zeros((), requires_grad=True)  # makes the marked outputs require grad
            return tuple(_Refuse.apply(o, anchor, op) if isinstance(o, torch.Tensor) else o for o in outputs)
        return wrapper
    return decorate
