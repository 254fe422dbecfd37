"""Benchmark of ``stream_pre`` (the fused Triton kernel, or on CPU with ``--backend numba`` the fused numba
kernels, projection GEMMs included) against the PyTorch reference (eager and compiled).

Floor per token: forward reads X and writes u, ``(n+1) C`` values; backward reads X and du and
writes dX, ``(2n+1) C``. (The coefficients, ``2n+m`` fp32 per token, are left out.)

    python benchmarks/bench_stream_pre.py [-n 4] [--variant mhc] [--dtype bf16] [--shapes all] [--backend triton|numba]
"""
import _timing
import torch

import kromhc_vision as kv
from kromhc_vision.ops import reference


def cases(n, m, dtype, kind):
    for family, T, C in _timing.shapes(kind):
        K, size = 2 * n + m, dtype.itemsize
        dev = _timing.DEVICE
        inputs = [torch.randn(T, n, C, dtype=dtype, device=dev), 1 + 0.1 * torch.randn(n * C, device=dev),
                  0.02 * torch.randn(n * C, K, device=dev), torch.randn(K, device=dev), torch.randn(K, device=dev)]
        yield (f"{family} T={T} n={n} C={C} K={K}", [t.requires_grad_() for t in inputs], (1e-6,),
               T * (n + 1) * C * size, T * (2 * n + 1) * C * size)


def main():
    parser = _timing.base_parser(__doc__)
    parser.add_argument("--variant", choices=("hc", "mhc", "mhclite", "kromhc"), default="mhc", help="sets m")
    args = parser.parse_args()
    _timing.configure(args.backend)
    kernel = _timing.kernel("stream_pre")

    def stream_pre(*inputs):
        return kernel(*inputs)[:4]  # the fifth output is X, for the post step

    def stream_pre_reference(*inputs):
        return reference.stream_pre(*inputs)[:4]

    bandwidth = _timing.copy_bandwidth()
    for n in args.streams:
        m = kv.CONNECTIONS[args.variant].num_res_logits(n)
        _timing.run(f"stream_pre ({args.variant}, n={n}, {args.dtype})",
                    cases(n, m, _timing.DTYPES[args.dtype], args.shapes), stream_pre, stream_pre_reference, bandwidth)


if __name__ == "__main__":
    main()
