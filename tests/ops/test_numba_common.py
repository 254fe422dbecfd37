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


def test_ops_refuse_a_tensor_of_the_wrong_size_naming_it():
    """The kernels read each tensor by address, so a tensor of too few values must be refused before them, by name
    (it would otherwise be read past its end)."""
    import kromhc_vision  # noqa: F401  (registers the ops)
    ops = torch.ops.kromhc_vision
    X, n, C, T = torch.randn(5, 4, 8), 4, 8, 5
    cases = [
        (lambda: ops.cpu_stream_post_fwd(X, torch.randn(T - 1, C), torch.rand(T, n, n), torch.rand(T, n)),
         "stream_post: y of shape"),
        (lambda: ops.cpu_stream_post_bwd(X, torch.randn(T, C), torch.rand(T, n, n), torch.rand(T, n),
                                         torch.randn(T - 1, n, C)), "dout of shape"),
        (lambda: ops.cpu_stream_pre_fwd(X, torch.ones(n * C - 1), torch.zeros(n * C, 12), torch.ones(12),
                                        torch.zeros(12), 1e-6), "norm_weight of shape"),
        (lambda: ops.cpu_sinkhorn_bwd(torch.randn(T, n, n), 3, torch.randn(T - 1, n, n)), "sinkhorn backward: dout"),
        (lambda: ops.cpu_permutation_mix_bwd(torch.randn(T, 4), [2, 2], torch.randn(T - 1, n, n)),
         "permutation_mix backward: dout"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
