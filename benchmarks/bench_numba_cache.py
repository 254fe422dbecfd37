"""What numba's disk cache costs the CPU kernels: each numba op of the package run with its kernels as every process
after the first runs them (loaded from numba's cache, ``cache=True``) against the same Python functions compiled in
this process (``cache=False``), on the same inputs, interleaved, at ViT-Tiny's shapes.

Why the two can differ: numba compiles the body of a ``prange`` loop as a separate library (a "parfor gufunc",
optimised at O3), links it into the kernel's own module and optimises that module at O3 again; the object code it
caches is of that module. In the process that compiles, the gufunc's own library was loaded first, and calls
resolve to that copy; a process that loads the kernel from the cache runs the re-optimised copy, whose code
differs (register allocation, spills, loop forms). ``--once-optimised`` compiles the package kernels with that
second O3 pass left out for modules that link a parfor gufunc (a patch of numba's codegen in this process only,
not of the package): run it twice with its own ``NUMBA_CACHE_DIR``, and the second run's cached column is what a
package would cache without the second pass. Since b81c0ad the ops' bodies are ``cfunc`` s, optimised once (a cached body is the
code a fresh compile makes), and their parallel kernels only the small launchers that call them: the fresh
column is the ops with fresh launchers (:class:`FreshKernels`), so what this measures now is the launchers'.

Columns: ``cached ms`` (the package's dispatchers), ``fresh ms`` (new dispatchers of the same functions, compiled
here), medians over interleaved rounds, and ``cached/fresh`` (median of the per-round ratios; above 1: the cached
kernel is slower). ``loaded`` says whether the package's kernel came from the disk cache in this process (the first
run on a machine compiles it here, and then both columns run the same code).

    python benchmarks/bench_numba_cache.py [--ops stream_pre stream_post permutation_mix sinkhorn]
        [--tokens 3152] [--width 192] [--rounds 15] [--threads 2] [--once-optimised]
"""
import argparse
import contextlib
import gc
import importlib
import statistics
import time

import numba
import torch

from bench_models_cpu import commit, cpu_name
from kromhc_vision.cpu_allocator import configure_cpu_malloc
from kromhc_vision.ops import _custom_ops

MODULES = {name: importlib.import_module(f"kromhc_vision.ops.numba.{name}")
           for name in ("stream_pre", "stream_post", "permutation_mix", "sinkhorn")}


def fresh_copy(dispatcher):
    """A new dispatcher of ``dispatcher``'s Python function with its options, without the disk cache."""
    options = {k: v for k, v in dispatcher.targetoptions.items() if k not in ("cache", "nopython")}
    return numba.njit(**options)(dispatcher.py_func)


LAUNCHERS = ("_forward_launcher", "_backward_launcher", "launch")  # a module's parallel kernels, by the names it calls


class FreshKernels:
    """``module``'s parallel kernels compiled in this process: its launchers (:data:`LAUNCHERS`: ``stream_pre``'s
    own two, or the shared :func:`kromhc_vision.ops.numba._launch.launch` as the other ops reach it), new dispatchers
    of the same functions without the disk cache. Inside ``with`` it, the module's ops call them. The bodies they run
    are ``cfunc`` s (every op's since b81c0ad), optimised once: a cached body is the code a fresh compile makes, so
    only the launchers can differ (before b81c0ad, the ops' ``prange`` kernels did: the module docstring)."""

    def __init__(self, module):
        self.module, self.saved = module, {}
        self.copies = {name: fresh_copy(getattr(module, name)) for name in LAUNCHERS
                       if isinstance(getattr(module, name, None), numba.core.dispatcher.Dispatcher)}

    def __enter__(self):
        for name, value in self.copies.items():
            self.saved[name] = getattr(self.module, name)
            setattr(self.module, name, value)

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(self.module, name, value)


def loaded_from_cache(module) -> bool:
    """Whether the bodies of ``module`` made in this process and its launchers came from the disk cache."""
    # by type: isinstance raises ReferenceError for a weak proxy whose referent is gone
    bodies = [b for b in gc.get_objects()
              if issubclass(type(b), numba.core.ccallback.CFunc) and b._pyfunc.__module__ == module.__name__]
    launchers = [getattr(module, name) for name in LAUNCHERS if hasattr(module, name)]
    return bool(bodies) and all(b.cache_hits for b in bodies) and \
        all(sum(d.stats.cache_misses.values()) == 0 for d in launchers)


def once_optimised():
    """Patch numba's codegen (this process only) to leave out the second full O3 pass over a module that links a
    parfor gufunc (the cheap pass that precedes it still runs)."""
    from numba.core import codegen
    original = codegen.CPUCodeLibrary._optimize_final_module

    def optimize_final_module(self):
        if not any("parfor_gufunc" in lib.name for lib in self._linking_libraries):
            return original(self)
        pm, pb = self._codegen._module_pass_manager(loop_vectorize=self._codegen._loopvect, slp_vectorize=False,
                                                    opt=self._codegen._opt_level, cost="cheap")
        pm.run(self._final_module, pb)
        if not numba.core.config.LLVM_REFPRUNE_PASS:
            self._final_module = codegen.remove_redundant_nrt_refct(self._final_module)

    codegen.CPUCodeLibrary._optimize_final_module = optimize_final_module


def stream_pre_args(X, dZ, du, h_res, h_pre, h_post, k, rand):
    """The numba ``stream_pre`` forward's and backward's arguments on the state ``X (T, n, C)`` at ``k``
    coefficients, the backward as a connection's linked one: no ``dX_post``; the post step's ``dZ`` and ``H_res``; no
    ``dh_pre`` (0 tokens: ``H_pre`` reaches no loss in a connection, and the kernel reads none; a commit before
    71b9b85 refuses that, as ``ab_numba_kernels.py`` then reports); ``dh_post`` and ``da_res``. ``(fwd_args,
    bwd_args)``; ``rand(*shape, scale=1.0)`` draws the rest."""
    T, n, C = X.shape
    W, scale, bias = rand(n * C, k, scale=0.05), rand(k, scale=0.1), rand(k)
    g_norm = torch.ones(n * C)
    fwd_args = (X, g_norm, W, scale, bias, 1e-6)
    outs = _custom_ops._IMPLEMENTATIONS[MODULES["stream_pre"]._stream_pre_fwd](*fwd_args)
    raw, inv_rms = outs[4], outs[5]
    bwd_args = (X, X.new_zeros(0, n * C), dZ, h_res, du, X.new_zeros(0, n), rand(T, n), rand(T, k - 2 * n), h_pre,
                h_post, raw, inv_rms, g_norm, W, scale)
    return fwd_args, bwd_args


def cases(T, C, ops):
    """(module, label, op, argument tuple): the numba ops named in ``ops``, forward and backward, at these shapes,
    float32, n = 4 (stream_pre at the coefficient counts of its variants)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    out = []
    n = 4
    X, dZ, u = rand(T, n, C), rand(T, n, C), rand(T, C)
    h_res = torch.softmax(rand(T, n, n), -1)
    h_pre, h_post = torch.sigmoid(rand(T, n)), 2 * torch.sigmoid(rand(T, n))
    sp = MODULES["stream_pre"]
    for k in (12, 24, 32) if "stream_pre" in ops else ():  # KromHC, HC / mHC, mHC-lite at n = 4
        fwd_args, bwd_args = stream_pre_args(X, dZ, u, h_res, h_pre, h_post, k, rand)
        out.append((sp, f"stream_pre fwd k={k}", sp._stream_pre_fwd, fwd_args))
        out.append((sp, f"stream_pre bwd k={k}", sp._stream_pre_bwd, bwd_args))
    spo = MODULES["stream_post"]
    if "stream_post" in ops:
        out.append((spo, "stream_post fwd", spo._stream_post_fwd, (X, u, h_res, h_post)))
        out.append((spo, "stream_post bwd (linked)", spo._stream_post_bwd, (X, u, h_res, h_post, dZ, False)))
    pm = MODULES["permutation_mix"]
    for factors in ([4], [2, 2]) if "permutation_mix" in ops else ():
        logits = rand(T, 24 if factors == [4] else 4, scale=2.0)
        out.append((pm, f"permutation_mix fwd {factors}", pm._permutation_mix_fwd, (logits, factors)))
        out.append((pm, f"permutation_mix bwd {factors}", pm._permutation_mix_bwd, (logits, factors, rand(T, n, n))))
    sk = MODULES["sinkhorn"]
    if "sinkhorn" in ops:
        logits = rand(T, n, n, scale=2.0)
        out.append((sk, "sinkhorn fwd (20 iters)", sk._sinkhorn_fwd, (logits, 20)))
        out.append((sk, "sinkhorn bwd (20 iters)", sk._sinkhorn_bwd, (logits, 20, rand(T, n, n))))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3152, help="tokens T (ViT-Tiny at batch 16: 3152)")
    parser.add_argument("--width", type=int, default=192, help="channels C")
    parser.add_argument("--ops", nargs="+", choices=tuple(MODULES), default=list(MODULES))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--once-optimised", action="store_true",
                        help="compile without numba's second O3 pass over parallel kernels (see the docstring)")
    args = parser.parse_args(argv)
    for name in ("tokens", "width", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.once_optimised:
        once_optimised()
    torch.set_num_threads(args.threads)
    configure_cpu_malloc("retain", torch.device("cpu"))
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, numba {numba.__version__}, {args.threads} threads; "
          f"commit {commit()}; cpu malloc: retain" + ("; once-optimised (numba patched)" if args.once_optimised
                                                      else ""))
    T, C = args.tokens, args.width
    print(f"numba ops, float32, T = {T}, n = 4, C = {C}; median ms over {args.rounds} interleaved rounds")
    fresh_by_module = {}
    print(f"{'op':<30}{'cached ms':>10}{'fresh ms':>10}{'cached/fresh':>14}  loaded")
    for module, label, op, inputs in cases(T, C, args.ops):
        fn = _custom_ops._IMPLEMENTATIONS[op]
        fn(*inputs)  # the package's kernels: loaded from the cache, or compiled (and cached) here
        loaded = loaded_from_cache(module)
        if module.__name__ not in fresh_by_module:
            fresh_by_module[module.__name__] = FreshKernels(module)
        fresh = fresh_by_module[module.__name__]
        with fresh:
            fn(*inputs)  # compiled here (once per module and shape)
        times = {"cached": [], "fresh": []}
        for r in range(args.rounds):
            for which in (("cached", "fresh") if r % 2 else ("fresh", "cached")):
                with fresh if which == "fresh" else contextlib.nullcontext():
                    t = time.perf_counter()
                    fn(*inputs)
                    times[which].append(time.perf_counter() - t)
        ratio = statistics.median(a / b for a, b in zip(times["cached"], times["fresh"]))
        print(f"{label:<30}{1e3 * statistics.median(times['cached']):>10.3f}"
              f"{1e3 * statistics.median(times['fresh']):>10.3f}{ratio:>14.3f}  {'yes' if loaded else 'no'}",
              flush=True)


if __name__ == "__main__":
    main()
