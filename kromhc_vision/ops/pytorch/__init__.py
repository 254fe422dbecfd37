"""The PyTorch backend: the three ops with hand-written backwards, tuned for the CPU, runnable on any device."""
from .permutation_mix import permutation_mix
from .sinkhorn import sinkhorn
from .stream_post import stream_post
from .stream_pre import stream_pre

__all__ = ["stream_pre", "stream_post", "sinkhorn", "permutation_mix"]
