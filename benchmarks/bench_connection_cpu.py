"""A connection's fixed cost on CPU: one eager connection step against the numba kernels inside it.

At small widths (the digits configs' ViT-Micro: ``T = 544`` tokens of ``4 x 64`` per connection at batch 32)
a hyper-connected step costs much more than its kernels: this measures by how much, and what the rest is made
of. For each variant, one connection (default init, float32, training mode, the default ``auto`` backend)
runs forward + backward on ``X (T, n, C)`` with an identity branch, as inside a model (the output's gradient
contiguous, no gradient accumulated into an existing ``.grad``: see :func:`_backward`); reported per step:

- ``step us``: wall-clock microseconds (median over interleaved rounds of the variants);
- ``kernel us``: microseconds inside the numba kernels (their dispatchers' entries in a ``cProfile`` run of the
  same steps: the kernel and numba's argument unboxing, no Python around it);
- ``pre us``, ``post us``, ``phi us``: the kernel time split by op: ``stream_pre``'s two kernels, ``stream_post``'s,
  and ``Phi``'s (``permutation_mix`` or ``sinkhorn``);
- ``pre GMAC/s``: the rate of the projection arithmetic inside the pre kernels, ``3 T nC k`` multiply-adds per
  step (``r = x W_g`` forward; ``dx += dr W_g^T`` and ``dW_g += x^T dr`` backward; ``k = 2n + m``) over ``pre us``:
  how close the largest part of a connection's kernels runs to the CPU's arithmetic peak; ``blas GMAC/s``: the
  same three products as PyTorch's BLAS GEMMs on their own (``x @ W_g``, ``dr @ W_g^T``, ``x^T @ dr``, no norm, no
  coefficients), for scale;
- ``rest us``: ``step - kernel``, the wrappers, allocation, dispatch and the autograd engine;
- ``py calls``: Python function calls per step (``cProfile``'s count: exact and machine-independent, the number
  that falls when the wrappers lose work);
- ``aten ops``: PyTorch operator calls per step (ATen ops, counted by a ``TorchDispatchMode``: also exact, each
  costing a fraction of a microsecond to a few), ``detach`` of them (until the kernels took tensors by address,
  201886b, every tensor handed to a kernel was one: ``Tensor.numpy()`` detaches inside).

Also printed: the time of an empty ``numba.prange`` loop call (the parallel launch cost of every kernel) beside
a serial one, and timm's residual connection (``X + F(X)``) for scale.

    python benchmarks/bench_connection_cpu.py [--variants hc mhc mhclite kromhc] [--streams 4] [--width 64]
        [--tokens 544] [--rounds 15] [--steps 200] [--threads 2] [--cpu-malloc retain|default]

ViT-Tiny's connection: ``--width 192 --tokens 3152`` (batch 16).
"""
import argparse
import collections
import cProfile
import functools
import gc
import pstats
import statistics

import numba
import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench_models_cpu import commit, cpu_name, numba_vectors, seconds_per_call
from kromhc_vision.connections import CONNECTIONS, build_connection
from kromhc_vision.cpu_allocator import CPU_MALLOC_CHOICES, configure_cpu_malloc

VARIANTS = [v for v in CONNECTIONS if v != "residual"]


def identity(u):
    return u


def _backward(out, dout, leaves):
    """``out.backward(dout)`` after setting the ``.grad`` of ``leaves`` to None: as in a model, where the
    gradient of a connection's output arrives contiguous from the next layer (a ``sum()``'s arrives as a
    broadcast view, which the kernels would copy), its input's gradient goes on to the previous layer (no
    ``X.grad`` accumulated: AccumulateGrad keeps the tensor it is handed), and ``zero_grad(set_to_none=True)``
    leaves the parameters' gradients None at each step."""
    for t in leaves:
        t.grad = None
    out.backward(dout)


def connection_step(conn, X, dout, leaves):
    """One forward + backward of ``conn`` on ``X`` with an identity branch; ``dout``: the output's gradient;
    ``leaves``: ``X`` and ``conn``'s parameters."""
    _backward(conn(X, identity), dout, leaves)


def residual_step(X, dout):
    """timm's residual connection in stream layout (one stream): ``X + F(X)``."""
    _backward(X + identity(X.squeeze(-2)).unsqueeze(-2), dout, (X,))


def time_us(fn, steps: int) -> float:
    return seconds_per_call(fn, steps) * 1e6


def kernel_codes():
    """``(filename, first line, name)`` of every compiled numba dispatcher: their entries in ``cProfile``'s stats."""
    codes = set()
    # by type, not isinstance: isinstance reads __class__ through the object, which warns for some of torch's
    # deprecated module attributes and raises ReferenceError for a weak proxy whose referent is gone
    dispatchers = [obj for obj in gc.get_objects() if issubclass(type(obj), numba.core.dispatcher.Dispatcher)]
    for obj in dispatchers:
        code = obj.py_func.__code__
        codes.add((code.co_filename, code.co_firstlineno, code.co_name))
    return codes


# the op each kernel belongs to, by the file that defines it (kromhc_vision/ops/numba/<file>.py), or for the launcher
# that several share (_launch.launch), by the file that calls it
KERNEL_OPS = {"stream_pre.py": "pre", "stream_post.py": "post", "permutation_mix.py": "phi", "sinkhorn.py": "phi"}


def _file(key) -> str:
    """The file name of a ``cProfile`` entry's key ``(filename, line, name)``."""
    return key[0].replace("\\", "/").rpartition("/")[2]


def profile_step(fn, steps: int, codes):
    """``(kernel microseconds per step by op (:data:`KERNEL_OPS`' values), Python calls per step)`` from a
    ``cProfile`` run of ``steps`` steps; ``codes``: :func:`kernel_codes`."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # key -> (primitive calls, calls, tottime, cumtime, callers)
    kernel_us = dict.fromkeys(KERNEL_OPS.values(), 0.0)
    for key, v in stats.items():
        if key in codes:
            # the shared launcher (_launch.py) by its callers' files, each caller's share of its time
            shares = v[4].items() if _file(key) == "_launch.py" else [(key, v)]
            for owner, timing in shares:
                op = KERNEL_OPS.get(_file(owner))
                if op is None:
                    raise RuntimeError(f"a numba kernel outside the known ops ran in the step: {key} from {owner}")
                kernel_us[op] += timing[2] / steps * 1e6
    calls = sum(v[1] for v in stats.values()) - 2  # less the profiler's own enable/disable entries
    return kernel_us, calls / steps


class AtenCounter(TorchDispatchMode):
    """Counts the ATen operator calls made while it is active, by operator name; with ``views=False`` only the
    computing ones (views, ``func.is_view``, left out)."""

    def __init__(self, views: bool = True):
        super().__init__()
        self.views = views
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.views or not func.is_view:
            self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def aten_calls(fn):
    """``(ATen operator calls, detach calls among them)`` of one call of ``fn``."""
    with AtenCounter() as counter:
        fn()
    return sum(counter.calls.values()), counter.calls["detach"]


@functools.lru_cache(maxsize=None)
def blas_gmacs(T: int, nC: int, k: int, steps: int) -> float:
    """GMAC/s of the pre step's three projection products as three BLAS GEMMs (float32), median of 5 runs; measured
    once per shape (HC and mHC share theirs)."""
    x, w, dr = torch.randn(T, nC), torch.randn(nC, k), torch.randn(T, k)

    def gemms():
        torch.mm(x, w), torch.mm(dr, w.t()), torch.mm(x.t(), dr)

    gemms()
    return 3 * T * nC * k / statistics.median(seconds_per_call(gemms, steps) for _ in range(5)) / 1e9


@numba.njit(parallel=True)
def _empty_parallel(a):
    for i in numba.prange(a.shape[0]):
        a[i] += 1.0


@numba.njit
def _empty_serial(a):
    for i in range(a.shape[0]):
        a[i] += 1.0


def launch_us(steps: int = 20000):
    """Microseconds per call of an empty parallel loop (2 elements) and of the same loop serial."""
    a = np.zeros(2)
    out = []
    for kernel in (_empty_parallel, _empty_serial):
        kernel(a)
        out.append(min(time_us(lambda: kernel(a), steps) for _ in range(3)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=544)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=200, help="steps per round and per profile")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-malloc", choices=CPU_MALLOC_CHOICES, default="retain",
                        help="as train.py's (kromhc_vision.cpu_allocator)")
    args = parser.parse_args(argv)
    for name in ("streams", "width", "tokens", "rounds", "steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    configure_cpu_malloc(args.cpu_malloc, torch.device("cpu"))
    torch.manual_seed(0)
    n, C, T = args.streams, args.width, args.tokens
    X, dout = torch.randn(T, n, C, requires_grad=True), torch.randn(T, n, C)
    X1, dout1 = torch.randn(T, 1, C, requires_grad=True), torch.randn(T, 1, C)
    steps = {"residual": lambda: residual_step(X1, dout1)}
    for variant in args.variants:
        conn = build_connection(variant, n, C)
        leaves = (X, *conn.parameters())
        steps[variant] = lambda conn=conn, leaves=leaves: connection_step(conn, X, dout, leaves)
    for fn in steps.values():  # compile the kernels, warm the allocator
        for _ in range(20):
            fn()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):  # interleaved: each round times every variant once
        for name, fn in steps.items():
            times[name].append(time_us(fn, args.steps))
    parallel, serial = launch_us()
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, numba {numba.__version__}, {args.threads} threads; "
          f"commit {commit()}; cpu malloc: {args.cpu_malloc}; numba vectors: {numba_vectors()}")
    print(f"one connection, forward + backward, identity branch: T = {T}, n = {n}, C = {C}, float32; "
          f"{args.rounds} rounds of {args.steps} steps")
    print(f"empty numba loop call: parallel (prange) {parallel:.2f} us, serial {serial:.2f} us")
    print(f"{'variant':10} {'step us':>8} {'kernel us':>10} {'rest us':>8} {'kernels':>8} {'py calls':>9} "
          f"{'aten ops':>9} {'detach':>7} {'pre us':>7} {'post us':>8} {'phi us':>7} {'pre GMAC/s':>11} {'blas GMAC/s':>12}")
    codes = kernel_codes()  # every kernel has compiled in the warm-up
    for name, fn in steps.items():
        step = statistics.median(times[name])
        by_op, calls = profile_step(fn, args.steps, codes)
        aten, detach = aten_calls(fn)
        kernel = sum(by_op.values())
        k = 0 if name == "residual" else 2 * n + CONNECTIONS[name].num_res_logits(n)
        rate = f"{3 * T * n * C * k / by_op['pre'] / 1e3:11.1f}" if by_op["pre"] else f"{'-':>11}"
        blas = f"{blas_gmacs(T, n * C, k, args.steps):12.1f}" if k else f"{'-':>12}"
        print(f"{name:10} {step:8.0f} {kernel:10.0f} {step - kernel:8.0f} {kernel / step:8.0%} {calls:9.0f} "
              f"{aten:9d} {detach:7d} {by_op['pre']:7.0f} {by_op['post']:8.0f} {by_op['phi']:7.0f} {rate} {blas}")


if __name__ == "__main__":
    main()
