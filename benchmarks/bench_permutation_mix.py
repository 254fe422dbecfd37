"""Benchmark of ``permutation_mix`` (mHC-lite's and KromHC's ``H_res``): a kernel backend's op against the PyTorch
backend's, the numba kernel on CPU (``auto`` runs it for every factorisation; the last column says which op
``auto`` runs) or, with ``--backend triton``, the Triton kernel on CUDA (timed by ``triton.testing.do_bench``;
without a GPU in Triton's interpreter on CPU: a smoke run, its timings meaningless).

Forward + backward of ``(T, sum_k i_k!)`` logits to ``(T, n, n)``, float32, for single factors (mHC-lite,
``n!`` logits) and Kronecker products (KromHC), at the digits model's ``T = 544`` (ViT-Micro, batch 32) and
ViT-Tiny's ``T = 3152`` (batch 16). Values and gradients are checked against each other first; times are
medians over interleaved rounds (numba, PyTorch, numba, ...), with the paired ratio ``torch / numba`` (above 1:
the kernel is faster) and which of the two ``auto`` runs. ``torch ops``: the PyTorch backend's computing ATen
operators, forward / backward, per call (counted by a ``TorchDispatchMode``, views left out): what a kernel
backend replaces by one launch per direction.

    python benchmarks/bench_permutation_mix.py [--tokens 544 3152] [--rounds 7] [--threads 2]
        [--cpu-malloc retain|default] [--backend numba|triton]

On a GPU: ``--backend triton --tokens 12608 25216`` (ViT-B at batch 64 and 128).
"""
import argparse
import math
import os
import statistics
import sys

import torch

if any(a.split("=")[-1] == "triton" for a in sys.argv[1:]) and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by kromhc_vision.ops.triton)

from bench_connection_cpu import AtenCounter
from bench_models_cpu import commit, cpu_name, seconds_per_call
from kromhc_vision.cpu_allocator import CPU_MALLOC_CHOICES, configure_cpu_malloc
from kromhc_vision.ops import dispatch
from kromhc_vision.permutations import permutation_matrices

FACTORS = [(2,), (3,), (4,), (5,), (6,), (2, 2), (2, 3), (2, 2, 2)]


def triton_runs_kernel(factors) -> bool:
    from kromhc_vision.ops.triton.permutation_mix import runs_kernel
    return runs_kernel(factors)


def step(logits, perms, cotangent, backend):
    dispatch.permutation_mix(logits, perms, backend).backward(cotangent)


def torch_ops(logits, perms, cotangent) -> tuple[int, int]:
    """``(forward, backward)`` computing ATen operator calls of the PyTorch backend's ``permutation_mix``."""
    with AtenCounter(views=False) as forward:
        out = dispatch.permutation_mix(logits, perms, "torch")
    with AtenCounter(views=False) as backward:
        torch.autograd.grad(out, logits, cotangent)
    return sum(forward.calls.values()), sum(backward.calls.values())


def milliseconds(fn, reps: int, device: torch.device) -> float:
    """Milliseconds per call of ``fn``: ``do_bench``'s median on CUDA, else over ``reps`` calls."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, return_mode="median")
    return 1e3 * seconds_per_call(fn, reps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[544, 3152])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-malloc", choices=CPU_MALLOC_CHOICES, default="retain",
                        help="as train.py's (kromhc_vision.cpu_allocator)")
    parser.add_argument("--backend", choices=("numba", "triton"), default="numba",
                        help="whose kernel: numba on CPU, Triton on CUDA (in its interpreter without a GPU)")
    args = parser.parse_args(argv)
    for name, values in (("tokens", args.tokens), ("rounds", [args.rounds]), ("threads", [args.threads])):
        if min(values) < 1:
            parser.error(f"--{name} must be >= 1, got {min(values)}")
    kernel = args.backend
    device = torch.device("cuda" if kernel == "triton" and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    configure_cpu_malloc(args.cpu_malloc, device)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu_name()}"
    print(f"{where}; torch {torch.__version__}, {args.threads} threads; commit {commit()}; "
          f"cpu malloc: {args.cpu_malloc}")
    if kernel == "triton" and device.type == "cpu":
        print("NOTE: no GPU, the Triton kernel runs in Triton's CPU interpreter: its timings are meaningless.")
    print(f"permutation_mix forward + backward, float32; median ms over {args.rounds} interleaved rounds")
    print(f"{'factors':<10}{'logits':>7}{'T':>7}{kernel + ' ms':>10}{'torch ms':>10}{'torch/' + kernel:>13}"
          "  torch ops  auto runs")
    for T in args.tokens:
        for factors in FACTORS:
            n = math.prod(factors)
            m = sum(math.factorial(k) for k in factors)
            perms = [permutation_matrices(k, device=device) for k in factors]
            logits = (2 * torch.randn(T, m, device=device)).requires_grad_()
            cotangent = torch.randn(T, n, n, device=device)
            values = {}
            for backend in (kernel, "torch"):
                out = dispatch.permutation_mix(logits, perms, backend)
                values[backend] = (out, torch.autograd.grad(out, logits, cotangent)[0])
            for a, b in zip(values[kernel], values["torch"]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            reps = max(2, round(20000 / T / max(1.0, m / 24)))  # some 10-50 ms per timing
            smoke = kernel == "triton" and device.type == "cpu"  # the interpreter: tens of ms a call
            reps = 1 if smoke else reps
            times = {kernel: [], "torch": []}
            for backend in times:  # warm-up (the kernels compile on first use)
                for _ in range(1 if smoke else 3):
                    step(logits, perms, cotangent, backend)
            for _ in range(args.rounds):
                for backend in times:
                    times[backend].append(milliseconds(lambda: step(logits, perms, cotangent, backend), reps, device))
            ratio = statistics.median(t / k for k, t in zip(times[kernel], times["torch"]))
            auto = dispatch.backend_for("auto", device, "permutation_mix", n)
            if auto == "triton" and not triton_runs_kernel(factors):
                auto = "torch"  # Triton's op runs PyTorch's for this shape (so does the 'triton ms' column)
            ops = "{:>4} / {:<4}".format(*torch_ops(logits, perms, cotangent))
            print(f"{'x'.join(map(str, factors)):<10}{m:>7}{T:>7}{statistics.median(times[kernel]):>10.3f}"
                  f"{statistics.median(times['torch']):>10.3f}{ratio:>13.2f}  {ops:<9}  {auto}")


if __name__ == "__main__":
    main()
