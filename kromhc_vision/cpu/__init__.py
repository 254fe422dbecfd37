"""Numba kernels for the CPU: the parts of the stream-mixing steps PyTorch runs slowly on CPU (per-token
n x n products run as batched 4x4 GEMMs at a fraction of memory speed, chains of small ops that each
pass over the stream state), each a ``torch.library`` custom op with an exact backward: the post
step, the per-token part of the pre step around its BLAS projection, and mHC's Sinkhorn. Compiled on
first use (a few seconds; cached on disk where the package is writable).
"""
from .sinkhorn import sinkhorn
from .stream_post import stream_post
from .stream_pre import TOKEN_OPS as STREAM_PRE_TOKEN_OPS

__all__ = ["stream_post", "STREAM_PRE_TOKEN_OPS", "sinkhorn"]
