"""``stream_post`` on the PyTorch backend: batched products over tokens with a hand-written backward.

Reference: :func:`kromhc_vision.ops.reference.stream_post`.
"""
import torch

from ..reference import autocast_off, compute_dtype
from ._once import once_differentiable


class StreamPost(torch.autograd.Function):
    """:func:`kromhc_vision.ops.reference.stream_post` as batched products over tokens ``T``::

        X_next = H_res X + H_post^T y
        dX = H_res^T dZ,  dy = H_post dZ,  dH_res = dZ X^T,  dH_post = dZ y^T
    """

    @staticmethod
    def forward(ctx, X, y, h_res, h_post):
        n, C = X.shape[-2:]
        dtype = compute_dtype(X, h_res)
        with autocast_off(X.device):
            out = torch.bmm(h_res.reshape(-1, n, n).to(dtype), X.reshape(-1, n, C).to(dtype))
            out.baddbmm_(h_post.reshape(-1, n, 1).to(dtype), y.reshape(-1, 1, C).to(dtype))
        ctx.save_for_backward(X, y, h_res, h_post)
        # not a view (an autograd Function's view output cannot be changed in place, as a forward hook's
        # out.mul_(...) on a block would), without a copy
        return torch.ops.aten._unsafe_view(out, X.shape).to(X.dtype)

    @staticmethod
    @once_differentiable('stream_post')  # double backward raises DoubleBackwardUnsupportedError
    def backward(ctx, dout):
        X, y, h_res, h_post = ctx.saved_tensors
        n, C = X.shape[-2:]
        dtype = compute_dtype(X, h_res)
        d = dout.reshape(-1, n, C).to(dtype)
        x = X.reshape(-1, n, C).to(dtype)
        h = h_res.reshape(-1, n, n).to(dtype)
        return (
            torch.bmm(h.transpose(1, 2), d).view(X.shape).to(X.dtype),
            torch.bmm(h_post.reshape(-1, 1, n).to(dtype), d).view(y.shape).to(y.dtype),
            torch.bmm(d, x.transpose(1, 2)).view(h_res.shape).to(h_res.dtype),
            torch.bmm(y.reshape(-1, 1, C).to(dtype), d.transpose(1, 2)).view(h_post.shape).to(h_post.dtype),
        )


def stream_post(X, y, h_res, h_post):
    """Same signature and values as :func:`kromhc_vision.ops.reference.stream_post`."""
    return StreamPost.apply(X, y, h_res, h_post)
