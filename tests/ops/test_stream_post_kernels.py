"""Both ``stream_post`` kernels (Triton, numba) against :func:`stream_post_reference`: values and all four gradients."""
import pytest
import torch

from kromhc_vision.ops import numba as cpu, triton as kernels
from kromhc_vision.ops.reference import stream_post as stream_post_reference

SHAPES = [(2, 40, (3, 7)), (3, 72, (5,)), (4, 40, (2, 3, 3)), (6, 72, (9,)), (8, 40, (17,)), (4, 1, (2,))]
OPS = {"triton": (kernels.stream_post, "stream_post"), "numba": (cpu.stream_post, "cpu_stream_post")}


@pytest.fixture(params=sorted(OPS))
def kernel(request):
    """``(op, name of its custom ops without the _fwd / _bwd suffix)``."""
    return OPS[request.param]


def make_inputs(n, C, lead, dtype=torch.float64, coef_dtype=None):
    coef_dtype = coef_dtype or dtype
    tensors = (torch.randn(*lead, n, C, dtype=dtype), torch.randn(*lead, C, dtype=dtype),
               torch.randn(*lead, n, n, dtype=coef_dtype), torch.randn(*lead, n, dtype=coef_dtype))
    return [t.requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, C, lead", SHAPES)
def test_matches_reference(n, C, lead, dtype, compare, kernel):
    compare(kernel[0], stream_post_reference, make_inputs(n, C, lead, dtype))


def test_non_contiguous_inputs(compare, kernel):
    """Strided views (a transposed token grid) give the reference's values and gradients."""
    views = [t.transpose(0, 1) for t in make_inputs(4, 40, (6, 5))]
    assert not views[0].is_contiguous()
    compare(kernel[0], stream_post_reference, views)


@pytest.mark.parametrize("stream_dtype, branch_dtype",
                         [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)])
def test_bfloat16_with_float32_coefficients(stream_dtype, branch_dtype, compare, kernel):
    """bf16 streams, or fp32 streams with a bf16 branch output (autocast); coefficients fp32."""
    inputs = make_inputs(4, 72, (2, 5), stream_dtype, torch.float32)
    inputs[1] = inputs[1].detach().to(branch_dtype).requires_grad_()
    assert kernel[0](*inputs).dtype == stream_dtype
    compare(kernel[0], stream_post_reference, inputs)


def test_opcheck(kernel):
    ops = getattr(torch.ops.kromhc_vision, f"{kernel[1]}_fwd"), getattr(torch.ops.kromhc_vision, f"{kernel[1]}_bwd")
    inputs = make_inputs(3, 40, (5,))
    torch.library.opcheck(ops[0].default, inputs)
    detached = [t.detach() for t in inputs]
    torch.library.opcheck(ops[1].default, (*detached, torch.randn_like(detached[0])))
    if kernel[1] == "cpu_stream_post":  # dX left to the pre step (the numba pair's link): 0 tokens
        torch.library.opcheck(ops[1].default, (*detached, torch.randn_like(detached[0]), False))
