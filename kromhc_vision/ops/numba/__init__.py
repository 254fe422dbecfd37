"""The numba backend (CPU tensors): the parts of the stream-mixing ops PyTorch runs slowly on CPU (per-token
n x n products run as batched small GEMMs, chains of small ops that each pass over the stream state), each a
``torch.library`` custom op with an exact backward: the post step, the whole pre step (its projection GEMMs
included), mHC's Sinkhorn and the permutation mixing. Compiled on first use (cached on disk where the
package is writable).
"""
from .permutation_mix import permutation_mix
from .sinkhorn import sinkhorn
from .stream_post import stream_post
from .stream_pre import stream_pre

__all__ = ["stream_pre", "stream_post", "sinkhorn", "permutation_mix"]
