"""The numba ops of another commit against the working tree's, in one process, call by call: an A/B of a kernel
change that this VM's drift between processes does not blur.

For each op of ``bench_numba_cache.py``'s cases (ViT-Tiny's shapes by default), the op's module is loaded a second
time from ``git show REV:kromhc_vision/ops/numba/<op>.py`` (its custom ops renamed into a namespace of their own,
numba's disk cache off), and both versions run on the same inputs, alternated call by call, each call after a
write of a buffer larger than the caches (as in a model; ``--hot``: none). Both versions' kernels are compiled in
this process (a cached kernel can differ from a fresh compile of the same code: ``bench_numba_cache.py``; of
the tree's, its launchers: its ``cfunc`` bodies are the same code cached or not). Before
timing, the two versions' outputs are compared (``same``: bitwise equal, or the largest difference).

Columns: ``REV ms`` and ``tree ms``, medians; ``tree/REV``, the median of the per-call ratios (below 1: the working
tree is faster). The REV module imports ``_common`` and ``_launch`` (how tensors and bodies are handed to the
kernels) as of REV, and the other helpers as they are in the working tree (``_exp``, ``_prefetch``, ``_custom_ops``): a change there is not
A/B'd, and a REV whose op signature differs from the tree's cannot run (the error names the op).

    python benchmarks/ab_numba_kernels.py REV [--ops stream_pre stream_post permutation_mix sinkhorn]
        [--tokens 3152] [--width 192] [--calls 60] [--threads 2] [--hot] [--flush-mib 256]
"""
import argparse
import statistics
import subprocess
import sys
import types
from pathlib import Path

import numba
import torch

from bench_models_cpu import commit, cpu_name, numba_vectors
from bench_numba_cache import MODULES, FreshKernels, cases
from bench_pre_scaling_cpu import add_cache_arguments, call_s, flush_buffer
from kromhc_vision.cpu_allocator import configure_cpu_malloc
from kromhc_vision.ops import _custom_ops

ROOT = Path(__file__).resolve().parents[1]
_loaded = {}  # (commit, op module name) -> the module loaded from that commit


def module_at(rev: str, name: str):
    """The numba op module ``name`` as of commit ``rev``: its custom ops in the namespace ``kromhc_vision_ab_<sha>``,
    its kernels uncached; loaded once per commit and module."""
    sha = subprocess.run(["git", "rev-parse", "--short=12", rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    key = (sha, name)
    if key not in _loaded:
        path = f"kromhc_vision/ops/numba/{name}.py"
        shown = subprocess.run(["git", "show", f"{sha}:{path}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode:
            raise ValueError(f"{path} is not in commit {rev} ({sha}): {shown.stderr.strip()}")
        source = shown.stdout.replace("cache=True", "cache=False").replace('"kromhc_vision::',
                                                                           f'"kromhc_vision_ab_{sha}::')
        # the kernels' helpers for handing tensors and bodies over, as of the same commit (where it has them)
        for helper in ("_common", "_launch"):
            if name != helper and f"from .{helper} import" in source:
                source = source.replace(f"from .{helper} import", f"from {module_at(rev, helper).__name__} import")
        module = types.ModuleType(f"kromhc_vision.ops.numba._ab_{sha}_{name}")
        module.__package__ = "kromhc_vision.ops.numba"  # its other relative imports: the working tree's helpers
        module.__file__ = f"{sha}:{path}"
        sys.modules[module.__name__] = module
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        _loaded[key] = module
    return _loaded[key]


def attribute_of(module, value) -> str:
    """The name under which ``module`` holds ``value``."""
    return next(k for k, v in vars(module).items() if v is value)


def difference(a, b) -> str:
    """``yes`` where every output tensor is bitwise equal, else the largest absolute difference."""
    a, b = (x if isinstance(x, (tuple, list)) else (x,) for x in (a, b))
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return "shapes differ"
    if all(torch.equal(x, y) for x, y in zip(a, b)):
        return "yes"
    return f"{max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b) if x.numel()):.1e}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the commit to compare the working tree's kernels with")
    parser.add_argument("--ops", nargs="+", choices=tuple(MODULES), default=list(MODULES))
    parser.add_argument("--tokens", type=int, default=3152, help="tokens T (ViT-Tiny at batch 16: 3152)")
    parser.add_argument("--width", type=int, default=192, help="channels C")
    parser.add_argument("--calls", type=int, default=60, help="timed calls of each version per op")
    parser.add_argument("--threads", type=int, default=2)
    add_cache_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("tokens", "width", "calls", "threads", "flush_mib"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        old_modules = {name: module_at(args.rev, name) for name in args.ops}
    except (ValueError, subprocess.CalledProcessError) as e:
        parser.error(f"cannot load the ops of {args.rev!r}: {getattr(e, 'stderr', None) or e}")
    torch.set_num_threads(args.threads)
    configure_cpu_malloc("retain", torch.device("cpu"))
    flush = flush_buffer(args)
    setting = "no write between calls (hot)" if args.hot else f"each call after a {args.flush_mib} MiB write"
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, numba {numba.__version__}, {args.threads} threads; "
          f"tree: commit {commit()}; REV: {args.rev}; numba vectors: {numba_vectors()} (REV's kernels: their own)")
    print(f"numba ops, float32, T = {args.tokens}, n = 4, C = {args.width}; both versions compiled here, "
          f"alternated call by call, {args.calls} calls each, {setting}")
    print(f"{'op':<30}{'REV ms':>9}{'tree ms':>9}{'tree/REV':>10}  same")
    fresh = {}
    for module, label, op, inputs in cases(args.tokens, args.width, args.ops):
        name = module.__name__.rpartition(".")[2]
        attribute = attribute_of(module, op)
        old_op = getattr(old_modules[name], attribute, None)
        if old_op is None:
            raise SystemExit(f"{args.rev} has no {name}.{attribute}: its ops differ from the tree's")
        old_fn, new_fn = _custom_ops._IMPLEMENTATIONS[old_op], _custom_ops._IMPLEMENTATIONS[op]
        if name not in fresh:
            fresh[name] = FreshKernels(module)
        with fresh[name]:
            same = difference(old_fn(*inputs), new_fn(*inputs))  # also compiles both
            times = {"old": [], "new": []}
            for call in range(args.calls):
                for which in (("old", "new") if call % 2 else ("new", "old")):
                    fn = old_fn if which == "old" else new_fn
                    times[which].append(call_s(lambda: fn(*inputs), flush, args.hot))
        ratio = statistics.median(b / a for a, b in zip(times["old"], times["new"]))
        print(f"{label:<30}{1e3 * statistics.median(times['old']):>9.3f}{1e3 * statistics.median(times['new']):>9.3f}"
              f"{ratio:>10.3f}  {same}", flush=True)


if __name__ == "__main__":
    main()
