"""Helpers shared by the CPU kernels: threads and array views."""
import threading

import numba
import torch

_thread_count = threading.local()  # what match_torch_threads last set in this thread (numba's setting is per thread)


def numpy_view(t: torch.Tensor):
    """A contiguous CPU tensor as a NumPy array sharing its memory (gradient tracking dropped).

    ``detach`` only where needed: it makes a new tensor (microseconds), and a connection passes some thirty
    arrays to its kernels per step, most of them outputs and gradients that track nothing."""
    if t.requires_grad:
        t = t.detach()
    return t.contiguous().numpy()


def match_torch_threads() -> int:
    """Run the parallel loops on as many threads as PyTorch's intra-op pool; returns that number."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if getattr(_thread_count, "value", None) != threads:  # numba.set_num_threads costs ~10 us a call
        numba.set_num_threads(threads)
        _thread_count.value = threads
    return threads
