"""``permutation_mix`` on the PyTorch backend (mHC-lite's and KromHC's ``H_res``): the ops of
:func:`kromhc_vision.residual_maps.kronecker_birkhoff`, with each factor's softmax weights recomputed in the
backward pass from the logits instead of kept.

Per token and factor of size ``k``, autograd would keep the ``k!`` float64 weights ``w = softmax(a)``: for
mHC-lite at n = 4, 24 doubles per token and connection, three times ``H_res`` itself. Kept instead: each
factor's logits in their tokens-last copy (``k!`` values per token in the logits' dtype); forming ``w``
again is one small softmax per factor::

    forward:   w = softmax(a),  H = sum_p w_p P_p          (float64, rounded once to a's dtype)
    backward:  dw_p = <dH, P_p>,  da = w * (dw - <dw, w>)  (w formed again from a)

Reference: :func:`kromhc_vision.residual_maps.kronecker_birkhoff` differentiated by autograd.
"""
import torch

from ...residual_maps import birkhoff_tokens_last, kronecker_birkhoff


class BirkhoffMix(torch.autograd.Function):
    """One factor: ``(k!, T)`` logits and ``(k!, k, k)`` permutation matrices -> ``(k, k, T)``
    (:func:`kromhc_vision.residual_maps.birkhoff_tokens_last`); saves the logits only. Its backward is made of
    differentiable ops, so a second backward works."""

    @staticmethod
    def forward(ctx, logits, perms):
        ctx.save_for_backward(logits, perms)
        return birkhoff_tokens_last(logits, perms)

    @staticmethod
    def backward(ctx, grad):
        logits, perms = ctx.saved_tensors
        k = perms.shape[-1]
        weights = torch.softmax(logits.double(), dim=0)
        grad_weights = perms.reshape(perms.shape[0], k * k).double() @ grad.reshape(k * k, -1).double()
        grad_logits = torch._softmax_backward_data(grad_weights, weights, 0, torch.float64)
        return grad_logits.to(logits.dtype), None


def permutation_mix(logits: torch.Tensor, perms: list) -> torch.Tensor:
    """``(..., sum_k i_k!)`` logits and ``perms[k] = permutation_matrices(i_k)`` -> ``H_res (..., n, n)``.

    Same signature and values as :func:`kromhc_vision.residual_maps.kronecker_birkhoff`.
    """
    return kronecker_birkhoff(logits, perms, BirkhoffMix.apply)
