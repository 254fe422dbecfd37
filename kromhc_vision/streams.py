"""The stream state: expand one residual vector per token into n streams and reduce back.

Layout everywhere is ``(..., n, C)``: streams on the second-to-last axis, channels last and
contiguous, so one token's ``n x C`` block is one contiguous run of memory; the one exception is the expanded
input state, a broadcast view (see :func:`expand_streams`).
"""
import numbers

import torch


def is_int(value) -> bool:
    """Whether ``value`` is an integer (Python's or NumPy's), not a bool: what the argument checks take as a count
    (here for the maths layer, which imports nothing below it; :mod:`kromhc_vision.ops.reference` re-exports it)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def expand_streams(x: torch.Tensor, num_streams: int) -> torch.Tensor:
    """``(..., C) -> (..., n, C)``: ``X = 1_n x^T``, every stream ``x``.

    A broadcast view of ``x`` (stride 0 over the streams), not n copies: what the first connection keeps for
    its backward pass (under ``hc_recompute``, the first segment's start) is then ``C`` values per token, not
    ``n C``; every op takes strided states (the kernels copy the view into their layout as they read it).
    """
    if not is_int(num_streams) or num_streams < 1:
        raise ValueError(f"num_streams must be an int >= 1, got {num_streams!r}")
    return x.unsqueeze(-2).expand(x.shape[:-1] + (num_streams, x.shape[-1]))  # shape arithmetic torch.fx traces


def reduce_streams(X: torch.Tensor) -> torch.Tensor:
    """``(..., n, C) -> (..., C)``: ``x = (1/n) sum_i X_i``.

    The spec's sum and this mean differ by the factor n, which the following norm removes; the
    mean makes an identity-initialised network compute exactly its residual counterpart.
    """
    return X.mean(dim=-2)
