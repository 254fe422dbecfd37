"""Helpers shared by the kernels: dtypes, dot precision, autotune config lists and pruning."""
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
    """``triton.Config`` list: ``gpu`` entries are ``(meta, num_warps)``; one config in the interpreter."""
    if INTERPRETED:
        return [triton.Config(interpreter, num_warps=1)]
    return [triton.Config(meta, num_warps=w) for meta, w in gpu]


def prune_by_size(limit: int, size):
    """Autotune pruner keeping configs with ``size(args) <= limit`` elements of registers (the smallest if none).

    ``size`` gets the kernel arguments merged with the config's meta-parameters.
    """
    def prune(configs, named_args, **kwargs):
        def cost(cfg):
            return size({**named_args, **kwargs, **cfg.kwargs})
        return [c for c in configs if cost(c) <= limit] or [min(configs, key=cost)]
    return {"early_config_prune": prune}


@functools.lru_cache(maxsize=None)
def num_programs_hint(device: torch.device) -> int:
    """A few waves of programs: 4 per SM on CUDA, 2 otherwise."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2
