"""The projection GEMMs of ``stream_pre`` on CPU, in the layouts BLAS could be asked for them.

Per connection, with ``x (T, nC)`` the stream state, ``W_g (nC, k')`` the gained projection and ``dr (T, k')``::

    forward:  raw = x W_g                        (T, nC) @ (nC, k')
    backward: dx += dr W_g^T                     (T, k') @ (k', nC), into dx
              dW_g = x^T dr   or   (dr^T x)^T    (nC, T) @ (T, k')  or  (k', T) @ (T, nC)

The two spellings of ``dW_g`` are the same sums; BLAS picks different kernels for them. Timed interleaved (each
round runs every layout once, best of ``--repeats`` calls), median over rounds; the ratio column is each layout's
time over the first of its group, paired per round. ``x`` is re-read from DRAM in a model (each call here finds
it in cache): read the ratios, not the milliseconds.

    python benchmarks/bench_projection_gemms.py [--tokens 3152] [--width 768] [--columns 16 24 32] [--rounds 15]
        [--threads 2]
"""
import argparse
import statistics
import time

import torch

from bench_models_cpu import commit, cpu_name


def best_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def layouts(T: int, width: int, columns: int):
    """``{group: {name: fn}}``: the spellings of each GEMM, the first of each group as the project's before."""
    x, dx = torch.randn(T, width), torch.randn(T, width)
    weight, dr = torch.randn(width, columns), torch.randn(T, columns)
    return {
        "raw = x W_g": {"x @ W": lambda: x @ weight, "(W^T x^T)^T": lambda: (weight.t() @ x.t()).t()},
        "dx += dr W_g^T": {"dx.addmm_(dr, W.t())": lambda: dx.addmm_(dr, weight.t())},
        "dW_g": {"x.t() @ dr": lambda: x.t() @ dr, "(dr.t() @ x).t()": lambda: (dr.t() @ x).t()},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3152, help="T (ViT-Tiny at batch 16: 16 x 197)")
    parser.add_argument("--width", type=int, default=768, help="nC (ViT-Tiny at n = 4: 4 x 192)")
    parser.add_argument("--columns", type=int, nargs="+", default=[16, 24, 32], help="k' (padded 2n + m)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for name in ("tokens", "width", "rounds", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.columns) < 1:
        parser.error(f"--columns must be >= 1, got {args.columns}")
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {args.threads} threads; commit {commit()}")
    print(f"T = {args.tokens}, nC = {args.width}, float32, {args.rounds} interleaved rounds, best of {args.repeats}")
    print(f"{'k_pad':>5}  {'GEMM':16} {'spelling':24} {'ms':>7} {'x first':>8}")
    for columns in args.columns:
        groups = layouts(args.tokens, args.width, columns)
        for fns in groups.values():
            for fn in fns.values():
                fn()  # warm-up
        times = {(g, name): [] for g, fns in groups.items() for name in fns}
        for _ in range(args.rounds):
            for g, fns in groups.items():
                for name, fn in fns.items():
                    times[(g, name)].append(best_ms(fn, args.repeats))
        for g, fns in groups.items():
            first = times[(g, next(iter(fns)))]
            for name in fns:
                ratio = statistics.median(a / b for a, b in zip(times[(g, name)], first))
                print(f"{columns:>5}  {g:16} {name:24} {statistics.median(times[(g, name)]):7.3f} {ratio:8.2f}")


if __name__ == "__main__":
    main()
