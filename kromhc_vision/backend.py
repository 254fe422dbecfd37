"""Choosing between the Triton kernels, the numba kernels and the PyTorch reference for the stream-mixing steps.

``KROMHC_BACKEND`` (or the ``backend`` argument of connections and models) is one of
``auto`` (Triton on CUDA tensors, the numba kernels on CPU tensors, PyTorch where either is
missing), ``triton``, ``numba`` or ``torch`` (plain PyTorch everywhere). With
``TRITON_INTERPRET=1`` and ``triton`` the Triton kernels run on CPU in Triton's interpreter.
"""
import os

import torch

from .mixing import stream_post_torch, stream_pre_torch

BACKENDS = ("auto", "triton", "numba", "torch")


def resolve_backend(backend=None) -> str:
    """The backend name in force: the argument, else ``$KROMHC_BACKEND``, else ``auto``."""
    name = backend if backend is not None else os.environ.get("KROMHC_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid choices: {', '.join(BACKENDS)}")
    return name


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device):
    """Why Triton cannot run on ``device``, or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the 'triton' package is not installed"
    if device.type == "cuda" or triton_interpreted():
        return None
    return f"tensors are on {device.type!r}; Triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU"


def use_triton(backend: str, device: torch.device) -> bool:
    """Whether the given (resolved) backend runs the Triton kernels for tensors on ``device``."""
    if backend in ("torch", "numba"):
        return False
    if backend == "auto":
        return device.type == "cuda" and triton_unavailable_reason(device) is None
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend 'triton' was requested but cannot run: {reason}. Use backend 'auto' or 'torch'.")
    return True


_numba_import = []  # memo: [None] once the numba kernels imported, [reason] once they failed


def _numba_import_error():
    if not _numba_import:
        try:
            from . import cpu  # noqa: F401
        except ImportError as e:
            _numba_import.append(f"the numba kernels cannot be imported ({e})")
        else:
            _numba_import.append(None)
    return _numba_import[0]


def numba_unavailable_reason(device: torch.device):
    """Why the numba kernels cannot run on ``device``, or None when they can."""
    if device.type != "cpu":
        return f"tensors are on {device.type!r}; the numba kernels run on CPU tensors"
    return _numba_import_error()


def use_numba(backend: str, device: torch.device) -> bool:
    """Whether the given (resolved) backend runs the numba kernels for tensors on ``device``."""
    if backend == "auto":
        return numba_unavailable_reason(device) is None
    if backend != "numba":
        return False
    reason = numba_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend 'numba' was requested but cannot run: {reason}. Use backend 'auto' or 'torch'.")
    return True


def stream_pre(X, norm_weight, proj_weight, scale, bias, eps: float, backend: str):
    """``u, h_pre, h_post, a_res`` of :func:`kromhc_vision.mixing.stream_pre_reference`, by backend, then
    the stream state to hand to :func:`stream_post` (on CPU an alias of ``X`` that routes the post
    step's ``dX`` through pre's backward, see :func:`kromhc_vision.mixing.stream_pre_torch`). The
    numba backend runs the same ``StreamPre`` (its GEMMs in BLAS) with the per-token rest in numba
    kernels, :mod:`kromhc_vision.cpu.stream_pre`.
    """
    if use_triton(backend, X.device):
        from .kernels import stream_pre as stream_pre_triton

        return (*stream_pre_triton(X, norm_weight, proj_weight, scale, bias, eps), X)
    if use_numba(backend, X.device):
        from .cpu import STREAM_PRE_TOKEN_OPS

        return stream_pre_torch(X, norm_weight, proj_weight, scale, bias, eps, STREAM_PRE_TOKEN_OPS)
    return stream_pre_torch(X, norm_weight, proj_weight, scale, bias, eps)


def stream_post(X, y, h_res, h_post, backend: str):
    """``X_next`` of :func:`kromhc_vision.mixing.stream_post_reference`, by backend."""
    if use_triton(backend, X.device):
        from .kernels import stream_post as stream_post_triton

        return stream_post_triton(X, y, h_res, h_post)
    if use_numba(backend, X.device):
        from .cpu import stream_post as stream_post_numba

        return stream_post_numba(X, y, h_res, h_post)
    return stream_post_torch(X, y, h_res, h_post)
