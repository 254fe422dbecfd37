"""What the numba kernels cost before the first step: each op's compilation on first use, and its loading from
numba's disk cache in every later process.

Each op's forward and then its backward is called once on small inputs in a fresh Python process whose
``NUMBA_CACHE_DIR`` is an empty folder (``compile s``: what a machine's first training step pays, once per stream
count, dtype and vector width), then the same in a second process on the cache the first one wrote (``load s``:
what every later process pays). Then the same for each connection variant's first step (``--variants``: a
``build_connection(variant, n, 16, backend="numba")`` forward and backward, all its ops in one process: what a
machine's first training step pays for them, the numba start-up counted once). ``--passes`` adds, for the compiling process, numba's compiler passes that took
over a second per kernel (its ``pipeline_times``; a parallel kernel's ``native_parfor_lowering`` includes compiling
and optimising the bodies of its ``prange`` loops). The ops' kernels are ``cfunc`` bodies run by launchers
(:mod:`kromhc_vision.ops.numba._launch`), and numba keeps no pass times of a ``cfunc``: the passes are the
launchers' (``stream_pre``'s own two, or the shared ``launch``).

    python benchmarks/bench_compile_cpu.py [--ops stream_pre stream_post sinkhorn permutation_mix]
        [--variants hc mhc mhclite kromhc] [--streams 4] [--dtype float32|float64] [--passes]
"""
import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numba
import torch

from bench_models_cpu import commit, cpu_name, numba_vectors

OPS = ("stream_pre", "stream_post", "sinkhorn", "permutation_mix")
VARIANTS = ("hc", "mhc", "mhclite", "kromhc")


def _inputs(op: str, n: int, dtype):
    """Small inputs of ``op`` requiring grad, and its extra arguments (the kernels compile per dtype and ``n``,
    not per size)."""
    T, C = 8, 16

    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    if op == "stream_pre":
        k = 2 * n + n * n
        return [leaf(T, n, C), leaf(n * C), leaf(n * C, k), leaf(k), leaf(k)], (1e-6,)
    if op == "stream_post":
        return [leaf(T, n, C), leaf(T, C), leaf(T, n, n), leaf(T, n)], ()
    if op == "sinkhorn":
        return [leaf(T, n, n)], (20,)
    from kromhc_vision.permutations import kronecker_factors, permutation_matrices
    factors = kronecker_factors(n)
    return [leaf(T, sum(math.factorial(f) for f in factors))], ([permutation_matrices(f) for f in factors],)


def connection_child(variant: str, n: int, dtype) -> dict:
    """In the measured process: a ``variant`` connection's first step on the numba backend, forward and backward
    timed (every kernel its step runs: what a machine's first training step pays for it)."""
    from kromhc_vision.connections import build_connection
    conn = build_connection(variant, n, 16, backend="numba").to(dtype)
    X = torch.randn(8, n, 16, dtype=dtype, requires_grad=True)
    start = time.perf_counter()
    out = conn(X, lambda u: 2 * u)
    forward = time.perf_counter() - start
    start = time.perf_counter()
    out.square().sum().backward()
    return {"forward": forward, "backward": time.perf_counter() - start, "passes": {}}


def child(op: str, n: int, dtype_name: str, passes: bool) -> dict:
    """In the measured process: the first forward and backward call of ``op``'s numba kernels (or of a connection:
    ``op`` = ``connection:<variant>``), timed."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if op.startswith("connection:"):
        return connection_child(op.partition(":")[2], n, getattr(torch, dtype_name))
    kernels = importlib.import_module(f"kromhc_vision.ops.numba.{op}")
    fn = getattr(importlib.import_module("kromhc_vision.ops.numba"), op)
    inputs, extra = _inputs(op, n, getattr(torch, dtype_name))
    start = time.perf_counter()
    out = fn(*inputs, *extra)
    forward = time.perf_counter() - start
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
    start = time.perf_counter()
    torch.autograd.grad([o.sum() for o in outs], inputs, allow_unused=True)
    backward = time.perf_counter() - start
    result = {"forward": forward, "backward": backward, "passes": {}}
    if passes:
        # cfunc bodies run by launchers: numba keeps no pass times of a cfunc
        if hasattr(kernels, "_forward_launcher"):
            dispatchers = {"forward": kernels._forward_launcher, "backward": kernels._backward_launcher}
        else:
            dispatchers = {"launch": importlib.import_module("kromhc_vision.ops.numba._launch").launch}
        for name, dispatcher in dispatchers.items():
            for signature, cres in dispatcher.overloads.items():
                label = name if len(dispatcher.overloads) == 1 else f"{name} {signature[-1]}"  # by its arguments
                for pipeline in cres.metadata.get("pipeline_times", {}).values():
                    slow = {p: t.init + t.run + t.finalize for p, t in pipeline.items()}
                    result["passes"][label] = {p: s for p, s in sorted(slow.items(), key=lambda i: -i[1]) if s > 1}
    return result


def run(op: str, n: int, dtype: str, cache_dir: str, passes: bool) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, __file__, "--child", op, str(n), dtype] + (["--passes"] if passes else []),
                         env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{op} n={n} {dtype}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS),
                        help="connections whose first step to time (none: --variants alone)")
    parser.add_argument("--passes", action="store_true", help="numba's slow compiler passes per kernel")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        op, n, dtype = args.child
        print(json.dumps(child(op, int(n), dtype, args.passes)))
        return
    print(f"CPU: {cpu_name()}; numba {numba.__version__}; commit {commit()}; numba vectors: {numba_vectors()}")
    print(f"numba ops, first forward and backward call, n = {args.streams}, {args.dtype}; one process each, with an "
          "empty numba cache (compile), then on its cache (load)")
    print(f"{'op':18}{'fwd compile s':>15}{'bwd compile s':>15}{'fwd load s':>12}{'bwd load s':>12}")
    total = [0.0, 0.0]
    notes = []
    for op in args.ops:
        with tempfile.TemporaryDirectory(prefix="numba_cache_") as cache_dir:
            first = run(op, args.streams, args.dtype, cache_dir, args.passes)
            second = run(op, args.streams, args.dtype, cache_dir, False)
        total[0] += first["forward"] + first["backward"]
        total[1] += second["forward"] + second["backward"]
        print(f"{op:18}{first['forward']:15.1f}{first['backward']:15.1f}{second['forward']:12.2f}"
              f"{second['backward']:12.2f}", flush=True)
        for kernel, slow in first["passes"].items():
            if slow:
                notes.append(f"  {op} {kernel}: " + ", ".join(f"{p} {t:.1f} s" for p, t in slow.items()))
    print(f"{'all':18}{total[0]:30.1f}{total[1]:24.2f}")
    for variant in args.variants:  # a connection's first step: its ops in one process
        with tempfile.TemporaryDirectory(prefix="numba_cache_") as cache_dir:
            first, second = (run(f"connection:{variant}", args.streams, args.dtype, cache_dir, False)
                             for _ in range(2))
        print(f"{variant + ' connection':18}{first['forward']:15.1f}{first['backward']:15.1f}"
              f"{second['forward']:12.2f}{second['backward']:12.2f}", flush=True)
    if notes:
        print("compiler passes over 1 s (the compiling process):")
        print("\n".join(notes))


if __name__ == "__main__":
    main()
