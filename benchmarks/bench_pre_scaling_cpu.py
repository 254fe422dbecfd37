"""How the numba pre step's time grows with the coefficient count ``k``: what its projection costs, what the rest
costs, each against the CPU's own yardstick.

The pre kernels (``kromhc_vision/ops/numba/stream_pre.py``) do two kinds of work per connection: the projection
products, ``T nC k`` multiply-adds each (``r = x W_g`` forward; ``dx += dr W_g^T`` and ``dW_g += x^T dr``
backward), and everything else (the norm, the coefficients, ``u``, the elementwise part of ``dx``), whose cost does
not depend on ``k`` and is mostly passes over the stream state. At ViT-Tiny's shape (``T = 3152`` tokens of
``n x C = 4 x 192``, batch 16) the kernels are timed for several ``k`` (HC / mHC have 24 coefficients at n = 4,
mHC-lite 32, KromHC 12), interleaved, each call after a write of a buffer larger than the caches (as in a model,
where the branches run between the connection's kernels). A least-squares line ``t = a + b k`` per direction gives:

- ``marginal GMAC/s``: the projection's rate, ``T nC`` (forward) or ``2 T nC`` (backward) multiply-adds per
  coefficient over ``b``. For scale, the table also times the same products as PyTorch ``mm`` s alone (``x W``
  forward; ``dr W^T`` and ``x^T dr`` backward) at each ``k``, the same way: no line is fitted to those, as
  BLAS's time is not linear in ``k`` at these skinny shapes (it pads ``k`` to its vector widths, and reading ``x``
  dominates);
- ``k-free ms``: ``a``, beside ``copy ms``: the bytes the kernel must move at least (forward: read ``X``, write
  ``u``; backward, as the models run it with the post step's gradient linked and no ``dh_pre``: read ``X``,
  ``dZ``, ``du``, write ``dX``) over this machine's copy bandwidth (read + write bytes/s of a copy larger than the
  caches): a floor for data that comes from memory, not for ``--hot`` calls, whose data partly stays in the caches;
- ``max resid``: the largest distance of a measured time from its line, for how well ``a + b k`` fits.

Where the kernels take little more than BLAS's bare products and the k-free part is near its copy time, the pre
step has no slack left on this CPU but the passes themselves (fusing them with the post step's). Prints the CPU's
name beside the figures.

    python benchmarks/bench_pre_scaling_cpu.py [--coefficients 12 24 32 48] [--tokens 3152] [--width 192]
        [--streams 4] [--rounds 7] [--calls 10] [--threads 2] [--hot] [--flush-mib 256]
"""
import argparse
import statistics
import time

import numba
import torch

from bench_models_cpu import commit, cpu_name, numba_vectors
from bench_numba_cache import MODULES, stream_pre_args
from kromhc_vision.cpu_allocator import configure_cpu_malloc
from kromhc_vision.ops import _custom_ops


def make_inputs(T: int, n: int, C: int, ks):
    """``{k: (fwd_args, bwd_args)}`` of the numba pre kernels on one stream state (:func:`stream_pre_args`)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    X, dZ, du = rand(T, n, C), rand(T, n, C), rand(T, C)
    h_res = torch.softmax(rand(T, n, n), -1)
    h_pre, h_post = torch.sigmoid(rand(T, n)), 2 * torch.sigmoid(rand(T, n))
    return {k: stream_pre_args(X, dZ, du, h_res, h_pre, h_post, k, rand) for k in ks}


def add_cache_arguments(parser) -> None:
    """``--hot`` and ``--flush-mib``: whether the timed calls find their data in the caches (see :func:`call_s`)."""
    parser.add_argument("--hot", action="store_true", help="no write between timed calls")
    parser.add_argument("--flush-mib", type=int, default=256,
                        help="MiB written before every timed call: more than the CPU's caches")


def flush_buffer(args) -> torch.Tensor:
    """The buffer :func:`call_s` writes: ``--flush-mib`` MiB, written once here (a never-written buffer reads the
    zero page)."""
    return torch.ones(args.flush_mib << 18)


def call_s(fn, flush: torch.Tensor, hot: bool = False) -> float:
    """Seconds of one call of ``fn()``, after a write of ``flush`` (not timed; none with ``hot``: the inputs stay in
    the caches as far as they fit), as in a model, where the branches run between a connection's kernels."""
    if not hot:
        flush.fill_(1.0)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_ms(fn, flush: torch.Tensor, calls: int, hot: bool = False) -> float:
    """Median milliseconds of ``fn()`` over ``calls`` calls timed by :func:`call_s`."""
    return 1e3 * statistics.median(call_s(fn, flush, hot) for _ in range(calls))


def copy_gbs(flush: torch.Tensor) -> float:
    """Read + write GB/s of copying half of ``flush`` into its other half (median of 9)."""
    half = flush.numel() // 2
    src, dst = flush[:half], flush[half:]
    times = []
    for _ in range(9):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times) / 1e9


def blas_steps(T: int, nC: int, k: int):
    """The forward's product and the backward's two as PyTorch ``mm`` s at ``k`` coefficients: ``(fwd, bwd)``."""
    x, w, dr = torch.randn(T, nC), torch.randn(nC, k), torch.randn(T, k)
    return (lambda: torch.mm(x, w)), (lambda: (torch.mm(dr, w.t()), torch.mm(x.t(), dr)))


def fit(ks, times):
    """Least squares ``t = a + b k``: ``(a, b)``."""
    b, a = statistics.linear_regression(ks, times)
    return a, b


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coefficients", nargs="+", type=int, default=[12, 24, 32, 48])
    parser.add_argument("--tokens", type=int, default=3152)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10, help="timed calls per round and k")
    parser.add_argument("--threads", type=int, default=2)
    add_cache_arguments(parser)
    args = parser.parse_args(argv)
    n, C, T = args.streams, args.width, args.tokens
    for name in ("tokens", "width", "rounds", "calls", "threads", "flush_mib"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if n < 2:
        parser.error(f"--streams must be >= 2, got {n}")
    bad = [k for k in args.coefficients if k <= 2 * n]
    if bad or len(set(args.coefficients)) < 2:
        parser.error(f"--coefficients needs at least two distinct values > 2n = {2 * n} "
                     f"(k = 2n + m, m >= 1); got {args.coefficients}")
    torch.set_num_threads(args.threads)
    configure_cpu_malloc("retain", torch.device("cpu"))
    flush = flush_buffer(args)
    fwd_op, bwd_op = MODULES["stream_pre"]._stream_pre_fwd, MODULES["stream_pre"]._stream_pre_bwd
    cases = make_inputs(T, n, C, args.coefficients)
    for fwd_args, bwd_args in cases.values():  # compile, warm the allocator
        for _ in range(3):
            _custom_ops.call(fwd_op, *fwd_args), _custom_ops.call(bwd_op, *bwd_args)
    steps = {k: (lambda a=fwd_args: _custom_ops.call(fwd_op, *a), lambda a=bwd_args: _custom_ops.call(bwd_op, *a),
                 *blas_steps(T, n * C, k)) for k, (fwd_args, bwd_args) in cases.items()}
    times = {k: ([], [], [], []) for k in cases}  # kernel fwd, kernel bwd, BLAS fwd, BLAS bwd
    for _ in range(args.rounds):  # interleaved over k
        for k, fns in steps.items():
            for series, fn in zip(times[k], fns):
                series.append(timed_ms(fn, flush, args.calls, args.hot))
    bandwidth = copy_gbs(flush)
    ks = sorted(cases)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, numba {numba.__version__}, {args.threads} threads; "
          f"commit {commit()}; numba vectors: {numba_vectors()}")
    setting = "no write between calls (hot)" if args.hot else f"each after a {args.flush_mib} MiB write"
    print(f"numba stream_pre kernels, T = {T}, n = {n}, C = {C}, float32; median of {args.rounds} rounds x "
          f"{args.calls} calls, {setting}; copy bandwidth {bandwidth:.1f} GB/s")
    print(f"{'k':>4} {'fwd ms':>8} {'bwd ms':>8} {'BLAS fwd ms':>12} {'BLAS bwd ms':>12}")
    medians = {k: tuple(statistics.median(t) for t in times[k]) for k in ks}
    for k in ks:
        print(f"{k:4d} {medians[k][0]:8.3f} {medians[k][1]:8.3f} {medians[k][2]:12.3f} {medians[k][3]:12.3f}")
    state = T * n * C * 4
    copy_ms = ((state + T * C * 4) / bandwidth / 1e6,  # read X, write u
               (3 * state + T * C * 4) / bandwidth / 1e6)  # read X, dZ, du, write dX
    print(f"{'':4} {'k-free ms':>10} {'copy ms':>8} {'ms/coef':>8} {'max resid':>10} {'marginal GMAC/s':>16}")
    for i, name in enumerate(("fwd", "bwd")):
        measured = [medians[k][i] for k in ks]
        a, b = fit(ks, measured)
        resid = max(abs(t - (a + b * k)) for k, t in zip(ks, measured))
        macs = (1 + i) * T * n * C  # per coefficient: forward r = x W_g; backward dx and dW_g
        print(f"{name:4} {a:10.3f} {copy_ms[i]:8.3f} {b:8.4f} {resid:10.3f} {macs / b / 1e6:16.1f}")


if __name__ == "__main__":
    main()
