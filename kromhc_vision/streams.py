"""The stream state: expand one residual vector per token into n streams and reduce back.

Layout everywhere is ``(..., n, C)``: streams on the second-to-last axis, channels last and
contiguous, so one token's ``n x C`` block is one contiguous run of memory.
"""
import torch


def expand_streams(x: torch.Tensor, num_streams: int) -> torch.Tensor:
    """``(..., C) -> (..., n, C)``: ``X = 1_n x^T``, every stream a copy of ``x``."""
    if num_streams < 1:
        raise ValueError(f"num_streams must be >= 1, got {num_streams}")
    return torch.stack([x] * num_streams, dim=-2)  # contiguous; no shape arithmetic, so torch.fx traces it


def reduce_streams(X: torch.Tensor) -> torch.Tensor:
    """``(..., n, C) -> (..., C)``: ``x = (1/n) sum_i X_i``.

    The spec's sum and this mean differ by the factor n, which the following norm removes; the
    mean makes an identity-initialised network compute exactly its residual counterpart.
    """
    return X.mean(dim=-2)
