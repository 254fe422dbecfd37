"""Helpers shared by the CPU kernels: threads and array views."""
import numba
import torch


def numpy_view(t: torch.Tensor):
    """A contiguous CPU tensor as a NumPy array sharing its memory (gradient tracking dropped)."""
    return t.detach().contiguous().numpy()


def match_torch_threads() -> int:
    """Run the parallel loops on as many threads as PyTorch's intra-op pool; returns that number."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads
