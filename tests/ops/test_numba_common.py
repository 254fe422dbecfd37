"""The numba kernels' helpers: tensors handed to kernels by address (``token_array``)."""
import numba
import numpy as np
import pytest
import torch

from kromhc_vision.ops.numba._common import KERNEL_SCALARS, token_array


@numba.njit(parallel=True)
def _scaled_copies(pa, pout1, pout2, n, like):
    """``out1 = 3 a`` (1-d) and ``out2[:, j] = j a`` (2-d), written in a ``prange`` and never read back."""
    a, out1, out2 = token_array(pa, like, (n,)), token_array(pout1, like, (n,)), token_array(pout2, like, (n, 2))
    for i in numba.prange(n):
        s = like
        for j in range(2):
            out2[i, j] = a[i] * j
            s += a[i] * (j + 1)
        out1[i] = s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_arrays_read_and_write_the_tensors(dtype):
    """Arrays over tensors' addresses, written inside a parallel loop: every store reaches the tensor (numba's
    dead-code elimination dropped the 1-d one's without the alias rule in ``_common``)."""
    a = torch.arange(9, dtype=dtype)
    out1, out2 = torch.full((9,), -1.0, dtype=dtype), torch.full((9, 2), -1.0, dtype=dtype)
    _scaled_copies(a.data_ptr(), out1.data_ptr(), out2.data_ptr(), 9, KERNEL_SCALARS[dtype])
    torch.testing.assert_close(out1, 3 * a, rtol=0, atol=0)
    torch.testing.assert_close(out2, torch.stack([0 * a, a], 1), rtol=0, atol=0)
    assert isinstance(KERNEL_SCALARS[dtype], np.floating)
