"""The stream-mixing ops every hyper-connection runs, and the backends that run them.

- :mod:`.reference`: the definitions in plain PyTorch, differentiated by autograd (what the tests compare with);
- :mod:`.dispatch`: which backend runs an op (``auto``, ``triton``, ``numba``, ``torch``);
- :mod:`.pytorch`, :mod:`.triton`, :mod:`.numba`: the backends, each with ``stream_pre``, ``stream_post`` and
  ``sinkhorn`` of the reference's signatures and values (one file per op).
"""
from .dispatch import (BACKENDS, OPS, backend_for, permutation_mix, resolve_backend, sinkhorn, stream_post,
                       stream_pre)

__all__ = ["BACKENDS", "OPS", "backend_for", "resolve_backend", "stream_pre", "stream_post", "sinkhorn",
           "permutation_mix"]
