"""Where a hyper-connected model's training step spends its time, by wall clock inside the model (no profiler).

``profile_step_cpu.py``'s profiler slows every op and attributes a Python autograd Function's kernels to it; this
wraps the connections' parts in ``perf_counter`` timers instead and runs ordinary training steps:

- ``Function``: each autograd Function of the ops layer (the numba and PyTorch ``StreamPre``, the numba ops'
  eager Functions, PyTorch's ``StreamPost`` / ``BirkhoffMix``), forward and backward, inclusive of everything they call
  (BLAS GEMMs, kernels, wrappers; a backward also whatever recomputation its saved tensors trigger);
- ``op``: each kernel backend function the Functions reach through ``_custom_ops.call`` (the numba kernels
  with their argument handling);
- ``kernel``: each numba kernel alone (the compiled function's call, dispatch included; for the ops whose bodies
  :func:`kromhc_vision.ops.numba._launch.launch` runs, their module's ``_run``: the launch and the few lines of
  Python that pick the body and the thread count): an ``op`` row less its ``kernel`` rows is what the op's Python
  wrapper costs inside the model, where the branches between the connections' calls leave the caches cold for it;
- ``Phi``: forming ``H_res`` from ``a_res``; ``recompute``: ``hc_recompute``'s segment recomputations, and its
  Python around the ops: ``pack`` / ``unpack`` (the saved-tensor hooks, ``unpack`` including the recomputation
  it triggers) and ``form_res_matrix`` (``Phi`` and the decision to keep ``H_res``).

Rows nest (a Function includes its ops): do not add them up. The step time of the residual model (timm's, the
same pairs as ``bench_models_cpu.py``) is measured in the same process, interleaved, for scale.

    python benchmarks/time_ops_in_model.py [--model vit|convnext|micro] [--variant kromhc] [--streams 4]
        [--steps 4] [--batch 16] [--recompute on|off] [--threads 2] [--cpu-malloc retain|default]
"""
import argparse
import collections
import contextlib
import statistics
import time
from importlib import import_module

import timm
import torch

from bench_models_cpu import add_pair_arguments, build_pair, commit, cpu_name, numba_vectors, step
from kromhc_vision import recompute
from kromhc_vision.connections import HyperConnection
from kromhc_vision.ops import _custom_ops


def _functions():
    """The ops layer's autograd Functions: (label, class)."""
    found = [(cls.__name__.removeprefix("Eager_"), cls) for cls in _custom_ops._EAGER_FUNCTIONS.values()]
    for package, module, name in (("numba", "stream_pre", "StreamPre"), ("numba", "stream_post", "LinkedStreamPost"),
                                  ("pytorch", "stream_pre", "StreamPre"),
                                  ("pytorch", "stream_post", "StreamPost"), ("pytorch", "permutation_mix", "BirkhoffMix")):
        found.append((f"{package} {name}", getattr(import_module(f"kromhc_vision.ops.{package}.{module}"), name)))
    return found


NUMBA_OP_MODULES = ("stream_pre", "stream_post", "sinkhorn", "permutation_mix")


@contextlib.contextmanager
def timers(totals: collections.defaultdict, calls: collections.Counter):
    """Wrap the connections' parts in timers adding to ``totals[row]`` (seconds) and ``calls[row]``; undone on exit."""
    undo = []

    def timed(row, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[row] += time.perf_counter() - start
                calls[row] += 1
        return wrapper

    def replace(owner, name, make):
        """``owner``'s ``name`` (a class attribute or a dict entry) becomes ``make(original)``."""
        original = owner.__dict__[name] if isinstance(owner, type) else owner[name]
        if isinstance(owner, type):
            setattr(owner, name, make(original))
            undo.append(lambda: setattr(owner, name, original))
        else:
            owner[name] = make(original)
            undo.append(lambda: owner.__setitem__(name, original))

    def patch(owner, name, row, static=False):
        replace(owner, name, lambda original: staticmethod(timed(row, original.__func__)) if static
                else timed(row, original))

    def timed_factory(module_name):
        """A numba op module's ``_kernels(...)`` (its kernels for a stream count) with each kernel timed."""
        def make(factory):
            made = {}

            def kernels(*args):
                if args not in made:
                    made[args] = tuple(timed(f"kernel numba.{module_name}.{kernel.__name__}", kernel)
                                       for kernel in factory(*args))
                return made[args]
            return kernels
        return make

    def timed_run(module_name):
        """A numba op module's ``_run(make_body, ...)`` timed, a row per body (forward, backward)."""
        def make(run):
            def wrapper(make_body, *args):
                row = f"kernel numba.{module_name}.{make_body.__name__.strip('_').removesuffix('_body')}"
                return timed(row, run)(make_body, *args)
            return wrapper
        return make

    for label, cls in _functions():
        patch(cls, "forward", f"Function {label}.forward", static=True)
        patch(cls, "backward", f"Function {label}.backward", static=True)
    for op, fn in list(_custom_ops._IMPLEMENTATIONS.items()):
        patch(_custom_ops._IMPLEMENTATIONS, op, f"op {'.'.join(fn.__module__.split('.')[-2:])}.{fn.__name__}")
    for name in NUMBA_OP_MODULES:
        module = import_module(f"kromhc_vision.ops.numba.{name}")
        if "_kernels" in module.__dict__:  # a factory of (forward, backward) kernels per stream count
            replace(module.__dict__, "_kernels", timed_factory(name))
        else:  # _run(make_body, ...): launches the body that make_body makes (_forward_body, _backward_body)
            replace(module.__dict__, "_run", timed_run(name))
    patch(HyperConnection, "_h_res", "Phi")
    patch(recompute._Segment, "recompute", "recompute")
    patch(recompute._Segment, "_pack", "recompute: pack")
    patch(recompute.__dict__, "_unpack", "recompute: unpack")
    patch(recompute._Segment, "form_res_matrix", "recompute: form_res_matrix")
    try:
        yield
    finally:
        for fn in reversed(undo):
            fn()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_arguments(parser, steps=4)
    parser.add_argument("--recompute", choices=("on", "off"), default="on", help="hc_recompute True (default) or False")
    args = parser.parse_args(argv)
    hyper, residual, x, title = build_pair(parser, args, hc_recompute=args.recompute == "on")
    totals, calls = collections.defaultdict(float), collections.Counter()
    for model in (residual, hyper):  # warm-up: kernels compiled, allocator primed
        step(model, x)
    steps = {"residual": [], "hyper": []}
    with timers(totals, calls):
        step(hyper, x)
        totals.clear()
        calls.clear()
        for _ in range(args.steps):
            steps["residual"].append(step(residual, x))
            steps["hyper"].append(step(hyper, x))
    res_ms, hyper_ms = (statistics.median(steps[k]) * 1e3 for k in ("residual", "hyper"))
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads; "
          f"commit {commit()}; cpu malloc: {args.cpu_malloc}; numba vectors: {numba_vectors()}")
    print(f"{title}: step {hyper_ms:.1f} ms (timed) vs residual {res_ms:.1f} ms, difference {hyper_ms - res_ms:.1f} ms")
    print(f"{'ms/step':>8} {'calls':>6} {'ms/call':>8}  part (rows nest: a Function includes its ops)")
    for row in sorted(totals, key=lambda r: -totals[r]):
        per_step = totals[row] / args.steps * 1e3
        print(f"{per_step:8.2f} {calls[row] / args.steps:6.0f} {per_step / (calls[row] / args.steps):8.3f}  {row}")


if __name__ == "__main__":
    main()
