"""Benchmark of the Sinkhorn kernel of mHC (Triton, or numba on CPU) against the PyTorch reference (eager and
compiled).

Floor per token: forward reads the logits and writes H_res, ``2 n^2`` fp32 values; backward
reads logits and dH_res and writes dlogits, ``3 n^2``. The op is compute-bound (``T`` iterations
forward; backward recomputes, ``O(T^2)`` in the Triton kernel, one replay in the numba one), so
``x floor`` is large by construction.

    python benchmarks/bench_sinkhorn.py [-n 4 8] [--iters 20] [--backend triton|numba]
"""
import _timing
import torch

from kromhc_vision.ops.reference import sinkhorn as sinkhorn_reference


def cases(n, iters, kind):
    for family, T in dict.fromkeys((family, T) for family, T, _ in _timing.shapes(kind)):  # no channel axis
        logits = -8 * (1 - torch.eye(n, device=_timing.DEVICE)) + torch.randn(T, n, n, device=_timing.DEVICE)
        yield (f"{family} T={T} n={n} iters={iters}", [logits.requires_grad_()], (iters,),
               T * 2 * n * n * 4, T * 3 * n * n * 4)


def main():
    parser = _timing.base_parser(__doc__)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    _timing.configure(args.backend)
    bandwidth = _timing.copy_bandwidth()
    for n in args.streams:
        _timing.run(f"sinkhorn (n={n}, {args.iters} iterations, fp32)", cases(n, args.iters, args.shapes),
                    _timing.kernel("sinkhorn"), sinkhorn_reference, bandwidth)


if __name__ == "__main__":
    main()
