"""Benchmark of ``permutation_mix`` (mHC-lite's and KromHC's ``H_res``) on CPU: the numba kernel against the
PyTorch backend's op (``auto`` runs the kernel for every factorisation; the last column says which it runs).

Forward + backward of ``(T, sum_k i_k!)`` logits to ``(T, n, n)``, float32, for single factors (mHC-lite,
``n!`` logits) and Kronecker products (KromHC), at the digits model's ``T = 544`` (ViT-Micro, batch 32) and
ViT-Tiny's ``T = 3152`` (batch 16). Values and gradients are checked against each other first; times are
medians over interleaved rounds (numba, PyTorch, numba, ...), with the paired ratio ``torch / numba`` (above 1:
the kernel is faster) and which of the two ``auto`` runs.

    python benchmarks/bench_permutation_mix.py [--tokens 544 3152] [--rounds 7] [--threads 2]
        [--cpu-malloc retain|default]
"""
import argparse
import math
import statistics

import torch

from bench_models_cpu import commit, cpu_name, seconds_per_call
from kromhc_vision.cpu_allocator import CPU_MALLOC_CHOICES, configure_cpu_malloc
from kromhc_vision.ops import dispatch
from kromhc_vision.permutations import permutation_matrices

FACTORS = [(2,), (3,), (4,), (5,), (6,), (2, 2), (2, 3), (2, 2, 2)]


def step(logits, perms, cotangent, backend):
    dispatch.permutation_mix(logits, perms, backend).backward(cotangent)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[544, 3152])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-malloc", choices=CPU_MALLOC_CHOICES, default="retain",
                        help="as train.py's (kromhc_vision.cpu_allocator)")
    args = parser.parse_args(argv)
    for name, values in (("tokens", args.tokens), ("rounds", [args.rounds]), ("threads", [args.threads])):
        if min(values) < 1:
            parser.error(f"--{name} must be >= 1, got {min(values)}")
    torch.set_num_threads(args.threads)
    configure_cpu_malloc(args.cpu_malloc, torch.device("cpu"))
    torch.manual_seed(0)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {args.threads} threads; commit {commit()}; "
          f"cpu malloc: {args.cpu_malloc}")
    print(f"permutation_mix forward + backward, float32; median ms over {args.rounds} interleaved rounds")
    print(f"{'factors':<10}{'logits':>7}{'T':>7}{'numba ms':>10}{'torch ms':>10}{'torch/numba':>12}  auto runs")
    cpu = torch.device("cpu")
    for T in args.tokens:
        for factors in FACTORS:
            n = math.prod(factors)
            m = sum(math.factorial(k) for k in factors)
            perms = [permutation_matrices(k) for k in factors]
            logits = (2 * torch.randn(T, m)).requires_grad_()
            cotangent = torch.randn(T, n, n)
            values = {}
            for backend in ("numba", "torch"):
                out = dispatch.permutation_mix(logits, perms, backend)
                values[backend] = (out, torch.autograd.grad(out, logits, cotangent)[0])
            for a, b in zip(values["numba"], values["torch"]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            reps = max(2, round(20000 / T / max(1.0, m / 24)))  # some 10-50 ms per timing
            times = {"numba": [], "torch": []}
            for backend in times:  # warm-up (the kernels compile on first use)
                for _ in range(3):
                    step(logits, perms, cotangent, backend)
            for _ in range(args.rounds):
                for backend in times:
                    times[backend].append(1e3 * seconds_per_call(lambda: step(logits, perms, cotangent, backend),
                                                                 reps))
            ratio = statistics.median(t / k for k, t in zip(times["numba"], times["torch"]))
            auto = dispatch.backend_for("auto", cpu, "permutation_mix", n)
            print(f"{'x'.join(map(str, factors)):<10}{m:>7}{T:>7}{statistics.median(times['numba']):>10.3f}"
                  f"{statistics.median(times['torch']):>10.3f}{ratio:>12.2f}  {auto}")


if __name__ == "__main__":
    main()
