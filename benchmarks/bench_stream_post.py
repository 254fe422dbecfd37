"""Benchmark of the fused ``stream_post`` kernel (Triton, or numba on CPU) against the PyTorch reference
(eager and compiled).

Floor per token: forward reads X, y and writes X_next, ``(2n+1) C`` values; backward reads
dX_next, X, y and writes dX, dy, ``(3n+2) C``. Together with ``stream_pre`` a layer's forward
floor is ``(3n+2) C``; the spec's ``(2n+2) C`` needs the post of layer l fused with the pre of
layer l+1 (X_next consumed on-chip), which these separate ops do not do.

    python benchmarks/bench_stream_post.py [-n 4] [--dtype bf16] [--shapes all] [--backend triton|numba]
"""
import _timing
import torch

from kromhc_vision.ops.reference import stream_post as stream_post_reference


def cases(n, dtype, kind):
    for family, T, C in _timing.shapes(kind):
        dev, size = _timing.DEVICE, dtype.itemsize
        inputs = [torch.randn(T, n, C, dtype=dtype, device=dev), torch.randn(T, C, dtype=dtype, device=dev),
                  torch.rand(T, n, n, device=dev), 2 * torch.rand(T, n, device=dev)]
        yield (f"{family} T={T} n={n} C={C}", [t.requires_grad_() for t in inputs], (),
               T * (2 * n + 1) * C * size, T * (3 * n + 2) * C * size)


def main():
    args = _timing.base_parser(__doc__).parse_args()
    _timing.configure(args.backend)
    bandwidth = _timing.copy_bandwidth()
    for n in args.streams:
        _timing.run(f"stream_post (n={n}, {args.dtype})", cases(n, _timing.DTYPES[args.dtype], args.shapes),
                    _timing.kernel("stream_post"), stream_post_reference, bandwidth)


if __name__ == "__main__":
    main()
