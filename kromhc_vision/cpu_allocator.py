"""CPU training with glibc's malloc: keep freed activation memory for the next step instead of returning it.

PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above ``M_MMAP_THRESHOLD`` (128 KiB, rising
to at most 32 MiB as such blocks are freed) with fresh ``mmap`` pages and gives them back on ``free``, and trims
the heap top above ``M_TRIM_THRESHOLD``: each training step then page-faults (and the kernel zeroes) its
activations again, megabytes per op. A hyper-connected model allocates an ``n C`` stream state per connection,
forward, backward and recomputed, so it pays this more than its residual counterpart
(``benchmarks/bench_models_cpu.py --cpu-malloc default`` measures the other setting). PyTorch's performance tuning guide answers the same cost by
preloading jemalloc or tcmalloc; this is the same effect with the C library the process already has:

    M_MMAP_THRESHOLD = 1 GiB (fixed: blocks up to that size come from the heap and are reused),
    M_TRIM_THRESHOLD = 1 GiB (the heap is not trimmed back between steps).

The process's resident memory then stays at its high-water mark, as with those allocators. ``train.py`` and
``eval.py`` call :func:`retain_freed_memory` when they run on CPU (``--cpu-malloc default`` leaves glibc as
it is); elsewhere it is opt-in. Nothing changes on other C libraries (musl, macOS), or for CUDA tensors,
which PyTorch's caching allocator already keeps.
"""
import ctypes
import ctypes.util
import platform

import torch

__all__ = ["CPU_MALLOC_CHOICES", "retain_freed_memory", "configure_cpu_malloc"]

CPU_MALLOC_CHOICES = ("retain", "default")
# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_RETAIN_BYTES = 1 << 30
_applied = None  # None: not asked; else what retain_freed_memory returned


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Set glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to 1 GiB for this process (see the module).
    Returns whether both took effect (False, changing nothing, on other C libraries); idempotent."""
    global _applied
    if _applied is None:
        libc = _glibc()
        _applied = bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, _RETAIN_BYTES) == 1
                        and libc.mallopt(_M_TRIM_THRESHOLD, _RETAIN_BYTES) == 1)
    return _applied


def configure_cpu_malloc(choice: str, device) -> bool:
    """The ``--cpu-malloc`` rule of ``train.py`` and ``eval.py``: on a CPU ``device``, ``'retain'`` calls
    :func:`retain_freed_memory`; ``'default'``, or any other device, leaves malloc alone. Returns whether
    memory is retained. Raises ``ValueError`` naming the value and the choices for any other ``choice``."""
    if choice not in CPU_MALLOC_CHOICES:
        raise ValueError(f"unknown cpu_malloc {choice!r}; valid choices: {', '.join(CPU_MALLOC_CHOICES)}")
    if choice == "retain" and torch.device(device).type == "cpu":
        return retain_freed_memory()
    return bool(_applied)
