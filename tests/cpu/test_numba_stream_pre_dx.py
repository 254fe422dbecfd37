"""numba ``stream_pre_dx`` against the PyTorch lines it replaces in ``StreamPre.backward``."""
import pytest
import torch

from kromhc_vision.cpu import stream_pre_dx


def make_inputs(T, n, C, dtype):
    return (torch.randn(T, n, C, dtype=dtype), torch.randn(T, n, C, dtype=dtype), torch.randn(T, dtype=dtype),
            torch.rand(T, n, dtype=dtype), torch.randn(T, C, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T, n, C", [(1, 2, 1), (7, 3, 40), (300, 4, 72), (5, 8, 40)])
def test_matches_torch(T, n, C, dtype):
    dX_post, x, coef, h_pre, du = make_inputs(T, n, C, dtype)
    expected = torch.addcmul(dX_post, x, coef[:, None, None]).baddbmm_(h_pre.unsqueeze(-1), du.unsqueeze(1))
    rtol, atol = (1e-12, 1e-12) if dtype == torch.float64 else (1e-6, 1e-6)
    torch.testing.assert_close(stream_pre_dx(dX_post, x, coef, h_pre, du), expected, rtol=rtol, atol=atol)


def test_opcheck():
    torch.library.opcheck(torch.ops.kromhc_vision.cpu_stream_pre_dx.default, make_inputs(5, 3, 40, torch.float64))
