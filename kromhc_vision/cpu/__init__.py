"""Numba kernels for the CPU: the stream-mixing steps whose per-token n x n products PyTorch runs
slowly on CPU (batched 4x4 GEMMs at a fraction of memory speed), each a ``torch.library`` custom op
with an exact backward. Compiled on first use (a few seconds; cached on disk where the package is
writable).
"""
from .sinkhorn import sinkhorn
from .stream_post import stream_post
from .stream_pre import TOKEN_OPS as STREAM_PRE_TOKEN_OPS

__all__ = ["stream_post", "STREAM_PRE_TOKEN_OPS", "sinkhorn"]
