"""The Triton ops' launches run with their tensors' device made current.

Triton launches on the current CUDA device (and in its current stream), not on the device of the pointers it is
given, and neither the custom ops nor the eager path set it: a model on ``cuda:1`` in a process whose current device
is ``cuda:0`` would run every kernel on ``cuda:0``. Without a GPU, the interpreter's CPU tensors stand in: the
test registers a recording guard for the ``cpu`` device type and checks that each kernel launch happens inside it.
"""
import importlib
import math

import pytest
import torch
import triton

from kromhc_vision.ops.triton import _common, permutation_mix, sinkhorn, stream_post, stream_pre
from kromhc_vision.permutations import permutation_matrices

# the modules (the package's names of the same spelling are the ops)
KERNEL_MODULES = [importlib.import_module(f"kromhc_vision.ops.triton.{name}")
                  for name in ("stream_pre", "stream_post", "sinkhorn", "permutation_mix")]


def _kernels():
    """Every autotuned kernel of the Triton ops' modules, by name."""
    return {name: obj for module in KERNEL_MODULES for name, obj in vars(module).items()
            if isinstance(obj, triton.runtime.Autotuner)}


@pytest.fixture
def launches(monkeypatch):
    """``{kernel name: [the devices made current at each launch]}``, recorded through a stand-in guard."""
    current, seen = [], {}

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    monkeypatch.setitem(_common._DEVICE_GUARDS, "cpu", Guard)
    for name, kernel in _kernels().items():
        def run(*args, _name=name, _run=kernel.run, **kwargs):
            seen.setdefault(_name, []).append(list(current))
            return _run(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", run)
    return seen


def test_every_launch_has_its_device_current(launches):
    """stream_pre ``X (T, n, C)``, stream_post, sinkhorn ``(T, n, n)`` and permutation_mix ``(T, m)``, forward and
    backward: each of the nine kernels launched, each launch inside one guard for its inputs' device."""
    T, n, C = 5, 2, 16
    K = 2 * n + n * n
    X = torch.randn(T, n, C, requires_grad=True)
    params = [torch.ones(n * C), 0.1 * torch.randn(n * C, K), torch.full((K,), 0.01), torch.zeros(K)]
    u, h_pre, h_post, a_res, _ = stream_pre(X, *[p.requires_grad_() for p in params], 1e-6)
    h_res = sinkhorn(a_res.unflatten(-1, (n, n)), 3)
    out = stream_post(X, u, h_res, h_post)
    mix = permutation_mix(torch.randn(T, math.factorial(3), requires_grad=True), [permutation_matrices(3)])
    torch.autograd.backward([out.sum(), h_pre.sum(), mix.square().sum()])
    assert set(launches) == set(_kernels()), "every kernel launched"
    for name, devices in launches.items():
        assert devices and all(d == [torch.device("cpu")] for d in devices), f"{name}: {devices}"
