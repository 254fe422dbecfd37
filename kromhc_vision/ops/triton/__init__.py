"""Triton kernels for the stream-mixing steps, each a ``torch.library`` custom op with an exact backward.

Run on CUDA tensors, or on CPU with ``TRITON_INTERPRET=1`` (set before triton is imported).
"""
from .permutation_mix import permutation_mix, prepare_permutation_mix
from .sinkhorn import sinkhorn
from .stream_post import stream_post
from .stream_pre import stream_pre

__all__ = ["stream_pre", "stream_post", "sinkhorn", "permutation_mix", "prepare_permutation_mix"]
