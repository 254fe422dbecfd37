"""Helpers shared by the kernels: dtypes, dot precision, autotune config lists and pruning by resources."""
import contextlib
import functools

import torch
import triton
import triton.language as tl

from ..dispatch import triton_interpreted

INTERPRETED = triton_interpreted()  # fixed when triton is imported, as Triton itself reads it

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products on tensor cores in three TF32 passes (fp32-accurate); fp64 only has 'ieee'."""
    return "ieee" if dtype == torch.float64 else "tf32x3"


def configs(gpu: list, interpreter: dict) -> list:
    """``triton.Config`` list: ``gpu`` entries are ``(meta, num_warps)`` or ``(meta, num_warps, num_stages)``
    (default 3 stages); one config in the interpreter."""
    if INTERPRETED:
        return [triton.Config(interpreter, num_warps=1)]
    return [triton.Config(entry[0], num_warps=entry[1], num_stages=entry[2] if len(entry) > 2 else 3)
            for entry in gpu]


# Opt-in shared memory per block on sm_80, the default target where no CUDA tensor says otherwise.
DEFAULT_SHARED_LIMIT = 166_912
# Registers a thread may hold for a kernel's tiles (of 255, leaving room for addresses, masks and loop state).
REGISTER_BUDGET = 96
_target_shared = []  # a stack of overrides (check-kernels compiles for archs this machine does not have)


@contextlib.contextmanager
def target_limits(shared_bytes: int):
    """Prune for a GPU with ``shared_bytes`` of shared memory per block instead of the tensors' device."""
    _target_shared.append(shared_bytes)
    try:
        yield
    finally:
        _target_shared.pop()


def shared_limit(named_args) -> int:
    """Shared memory per block a launch may use: the override, else the CUDA device of a tensor argument."""
    if _target_shared:
        return _target_shared[-1]
    for v in named_args.values():
        device = getattr(v, "device", None)
        if isinstance(device, torch.device) and device.type == "cuda":
            return _device_shared_limit(device)
    return DEFAULT_SHARED_LIMIT


@functools.lru_cache(maxsize=None)
def _device_shared_limit(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def nbytes(dtype) -> int:
    """Bytes of one element of a torch or Triton dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    return dtype.primitive_bitwidth // 8


def prune_by_resources(estimate):
    """Autotune pruner by an estimate of each config's resources on the launch's GPU.

    ``estimate(args, num_warps, num_stages)`` gets the kernel arguments merged with the config's
    meta-parameters and returns ``(shared memory bytes per block, 32-bit registers per thread for tiles)``.
    Kept: the configs within the shared memory limit and ``REGISTER_BUDGET``; if none, the one of least
    registers among those within the shared memory limit, else the one of least shared memory, then registers (which
    ``check-kernels`` then reports as a launch that does not fit).
    """
    def prune(configs, named_args, **kwargs):
        limit = shared_limit(named_args)

        def cost(cfg):
            return estimate({**named_args, **kwargs, **cfg.kwargs}, cfg.num_warps, cfg.num_stages)
        costs = {cfg: cost(cfg) for cfg in configs}
        kept = [c for c in configs if costs[c][0] <= limit and costs[c][1] <= REGISTER_BUDGET]
        if kept:
            return kept
        fitting = [c for c in configs if costs[c][0] <= limit]
        if fitting:
            return [min(fitting, key=lambda c: costs[c][1])]
        return [min(configs, key=lambda c: costs[c])]  # ties in shared memory: fewer registers (smaller tiles)
    return {"early_config_prune": prune}


AUTOTUNED = []  # the kernels made by autotune() below
_chosen = {}  # (id of an autotuned kernel, device kind) -> its cache of chosen configs on that kind of device
_kind_in_use = [None]


def autotune(*args, **kwargs):
    """``triton.autotune``, the kernel registered in :data:`AUTOTUNED` (see :func:`use_configs_of`)."""
    def register(fn):
        kernel = triton.autotune(*args, **kwargs)(fn)
        AUTOTUNED.append(kernel)
        return kernel
    return register


@functools.lru_cache(maxsize=None)
def device_kind(device: torch.device):
    """What the configs chosen for a launch depend on: the GPU's name, architecture and shared memory per block
    (what the pruners read); the device type elsewhere (the interpreter's CPU tensors)."""
    if device.type != "cuda":
        return device.type
    props = torch.cuda.get_device_properties(device)
    return props.name, props.major, props.minor, props.shared_memory_per_block_optin


def use_configs_of(kind) -> None:
    """Point each autotuned kernel's cache of chosen configs at the one for device ``kind``. Triton keys that cache
    by the launch's size arguments and dtypes only, so that in a process with two kinds of GPU a config chosen on one
    (and pruned for its shared memory) would be launched on the other. One comparison when the kind does not change."""
    if kind != _kind_in_use[0]:
        for kernel in AUTOTUNED:
            kernel.cache = _chosen.setdefault((id(kernel), kind), {})
        _kind_in_use[0] = kind


# Device type -> the context that makes a device current. Triton launches a kernel on the *current* CUDA device, in
# its current stream, whatever device the pointers it is given belong to; neither a custom op nor the eager path sets
# it (PyTorch's own ops have a device guard, these do not). The interpreter's CPU tensors need nothing.
_DEVICE_GUARDS = {"cuda": torch.cuda.device}


def on_device(tensor: torch.Tensor):
    """A context making ``tensor``'s device current around the launches on it: without it a model on ``cuda:1`` in a
    process whose current device is ``cuda:0`` (``eval.py --device cuda:1``, no ``set_device``) has its kernels run
    on ``cuda:0``, in ``cuda:0``'s stream, with pointers into ``cuda:1``'s memory. The autotuned kernels use the
    configs chosen on this kind of device (:func:`use_configs_of`)."""
    use_configs_of(device_kind(tensor.device))
    guard = _DEVICE_GUARDS.get(tensor.device.type)
    return contextlib.nullcontext() if guard is None else guard(tensor.device)


@functools.lru_cache(maxsize=None)
def num_programs_hint(device: torch.device) -> int:
    """A few waves of programs: 4 per SM on CUDA, 2 otherwise."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2
