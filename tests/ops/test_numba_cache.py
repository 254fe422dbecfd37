"""The numba kernels compile once per machine, not once per process: a second process loads every kernel it runs
from numba's disk cache (stream_pre's closures once held a dispatcher in a cell, whose pickle differs per process,
so their cache key never matched and every process spent ~10 s compiling them again)."""
import json
import os
import subprocess
import sys

# One step of a connection per numba op (stream_pre, stream_post, sinkhorn, permutation_mix), then every compiled
# kernel of the package with its cache hits and misses: dispatchers, and the C functions (cfuncs) of the ops'
# bodies, which compile or load once when made (a miss: made without a cache hit).
SCRIPT = """
import gc, json, numba, torch
from kromhc_vision.connections import build_connection
for variant in ("mhc", "kromhc"):
    X = torch.randn(3, 2, 8, requires_grad=True)
    build_connection(variant, 2, 8, backend="numba")(X, lambda u: u).sum().backward()
stats = {}
for d in gc.get_objects():
    if isinstance(d, numba.core.dispatcher.Dispatcher) and d.py_func.__module__.startswith("kromhc_vision") \\
            and d.overloads:
        name = d.py_func.__module__.rsplit(".", 1)[-1] + "." + d.py_func.__qualname__
        s = d.stats
        stats[name] = [sum(s.cache_hits.values()), sum(s.cache_misses.values())]
    if isinstance(d, numba.core.ccallback.CFunc) and d._pyfunc.__module__.startswith("kromhc_vision"):
        name = d._pyfunc.__module__.rsplit(".", 1)[-1] + "." + d._pyfunc.__qualname__
        stats[name] = [d.cache_hits, 1 - d.cache_hits]
print(json.dumps(stats))
"""


def _kernel_cache_stats(cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_every_kernel_from_the_disk_cache(tmp_path):
    first = _kernel_cache_stats(tmp_path)
    assert {"stream_pre._forward_body.<locals>.forward", "stream_pre._backward_body.<locals>.backward",
            "stream_pre._reduce_body.<locals>.reduce", "stream_pre._forward_launcher", "stream_pre._backward_launcher",
            "stream_post._forward_body.<locals>.forward", "stream_post._backward_body.<locals>.backward",
            "sinkhorn._forward_body.<locals>.forward", "sinkhorn._backward_body.<locals>.backward",
            "permutation_mix._forward_body.<locals>.forward", "permutation_mix._backward_body.<locals>.backward",
            "_launch.launch"} <= set(first)
    assert all(misses > 0 for _, misses in first.values())  # an empty cache: every kernel compiled
    second = _kernel_cache_stats(tmp_path)
    recompiled = {name: misses for name, (_, misses) in second.items() if misses}
    assert not recompiled, f"kernels compiled again in a second process (cache misses): {recompiled}"
    assert "stream_pre._backward_body.<locals>.backward" in second
