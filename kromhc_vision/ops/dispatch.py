"""Which backend runs each stream-mixing op: the one place that knows.

Every backend package (``pytorch``, ``triton``, ``numba``) provides ``stream_pre``, ``stream_post`` and
``sinkhorn`` with the signatures and values of :mod:`kromhc_vision.ops.reference`, and ``permutation_mix``
(mHC-lite's and KromHC's ``H_res``) with those of :func:`kromhc_vision.residual_maps.kronecker_birkhoff`
(the Triton package's runs PyTorch's ops for the shapes its kernels do not take: more than 128 logits, n > 16).

``KROMHC_BACKEND`` (or the ``backend`` argument of the ops, connections and models) is one of:

- ``auto``: Triton on CUDA tensors, the numba kernels on CPU tensors, PyTorch where the package is
  missing or the kernel does not take the shape (Triton's Sinkhorn: n <= 16). If a Triton kernel fails
  to compile or launch, ``auto`` warns once for that op and shape and runs the PyTorch path instead
  (in eager mode; under ``torch.compile`` the error is raised). That holds for the backward kernels too, which
  would first compile and launch in the first backward pass: the first call of an op and shape that records
  grad runs its backward once on zero gradients right away (:func:`_probe_backward`), so that a failure there
  also sends the op to the PyTorch path in both directions;
- ``triton``, ``numba``: those kernels, or an error saying why they cannot run;
- ``torch``: the PyTorch backend everywhere.

While ``torch.onnx.export`` or ``torch.jit.trace`` traces a model, every backend setting runs the definitions of
:mod:`kromhc_vision.ops.reference` (plain PyTorch operators, which both of torch's ONNX exporters translate and
TorchScript records): an ONNX graph holds standard operators only, and ONNX Runtime, not a backend, runs it. The
kernel backends' custom ops have no ONNX translation, the TorchScript tracer cannot see into the numba kernels
(they read tensors by address), and the TorchScript exporter cannot inline the PyTorch backend's autograd
Functions.

With ``TRITON_INTERPRET=1`` (set before triton is imported) ``triton`` runs the Triton kernels on CPU
tensors in Triton's interpreter, which is how the tests check them without a GPU.
"""
import os
import warnings

import torch

from ..residual_maps import kronecker_birkhoff
from . import reference

BACKENDS = ("auto", "triton", "numba", "torch")
OPS = ("stream_pre", "stream_post", "sinkhorn", "permutation_mix")
# Triton's Sinkhorn holds one token's n x n logits (padded to a power of two) in registers.
TRITON_SINKHORN_MAX_STREAMS = 16
# Above this many coefficients per token (2n + m; the kernels pad it to a power of two) Triton's stream_pre kernels spill
# kilobytes of registers at every tile (python -m kromhc_vision check-kernels): 'auto' runs PyTorch's there
# (HC / mHC at n = 16, mHC-lite at n = 6); 'triton' still runs them.
TRITON_STREAM_PRE_MAX_COEFFICIENTS = 256

# What ONNX export and torch.jit.trace trace, whatever the backend: the plain PyTorch definitions.
_DEFINITIONS = dict(stream_pre=reference.stream_pre, stream_post=reference.stream_post, sinkhorn=reference.sinkhorn,
                    permutation_mix=kronecker_birkhoff)
_import_errors = {}  # backend -> None once imported, or the reason it cannot be
_failed_kernels = {}  # (op, shape key) -> reason, for kernels that failed under 'auto'
_verified_backwards = set()  # (op, shape key) whose Triton backward has run under 'auto' (_probe_backward)


def resolve_backend(backend=None) -> str:
    """The backend name in force: the argument, else ``$KROMHC_BACKEND``, else ``auto``."""
    name = backend if backend is not None else os.environ.get("KROMHC_BACKEND", "auto")
    if name not in BACKENDS:
        source = "" if backend is not None else " (from $KROMHC_BACKEND)"
        raise ValueError(f"unknown backend {name!r}{source}; valid choices: {', '.join(BACKENDS)}")
    return name


def triton_interpreted() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_module(name: str):
    """The package of backend ``name`` (``torch``, ``triton`` or ``numba``), imported on first use
    (import statements, which torch.compile traces, where ``importlib`` would break the graph)."""
    if name == "torch":
        from . import pytorch as module
    elif name == "triton":
        from . import triton as module
    elif name == "numba":
        from . import numba as module
    else:
        raise ValueError(f"unknown kernel backend {name!r}; valid choices: torch, triton, numba")
    return module


def _import_error(name: str):
    if name not in _import_errors:
        try:
            backend_module(name)
        except ImportError as e:
            _import_errors[name] = f"the {name} kernels cannot be imported ({e})"
        else:
            _import_errors[name] = None
    return _import_errors[name]


def unavailable_reason(name: str, device: torch.device):
    """Why backend ``name`` cannot run on tensors of ``device``, or None when it can."""
    if name == "triton" and device.type != "cuda" and not triton_interpreted():
        return f"tensors are on {device.type!r}; Triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU"
    if name == "numba" and device.type != "cpu":
        return f"tensors are on {device.type!r}; the numba kernels run on CPU tensors"
    return None if name == "torch" else _import_error(name)


def unsupported_reason(name: str, op: str, num_streams: int):
    """Why backend ``name``'s kernel for ``op`` does not take ``num_streams`` streams, or None."""
    if name == "triton" and op == "sinkhorn" and num_streams > TRITON_SINKHORN_MAX_STREAMS:
        return f"Triton's Sinkhorn takes num_streams <= {TRITON_SINKHORN_MAX_STREAMS}, got {num_streams}"
    return None


def check_backend(backend, ops, num_streams: int) -> str:
    """Resolve ``backend`` and, when it names a kernel backend, check that its kernels for ``ops`` take
    ``num_streams`` (device-independent limits, checked when a connection is built). Returns the name."""
    name = resolve_backend(backend)
    for op in ops:
        reason = unsupported_reason(name, op, num_streams)
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot run {op}: {reason}; use backend 'auto' or 'torch'")
    return name


def _auto_avoids(name: str, op: str, coefficients: int) -> bool:
    """Kernels that run but badly, which ``auto`` leaves to PyTorch: see TRITON_STREAM_PRE_MAX_COEFFICIENTS."""
    return name == "triton" and op == "stream_pre" and coefficients > TRITON_STREAM_PRE_MAX_COEFFICIENTS


def backend_for(backend, device: torch.device, op: str = "stream_pre", num_streams: int = 0,
                coefficients: int = 0) -> str:
    """The backend (``torch``, ``triton`` or ``numba``) that runs ``op`` on ``device`` when ``backend`` is
    asked for: ``auto``'s rules, or the named backend (an error saying why, if it cannot run).
    ``coefficients``: stream_pre's ``2n + m`` per token."""
    name = resolve_backend(backend)
    if name == "auto":
        preferred = {"cuda": "triton", "cpu": "numba"}.get(device.type)
        usable = (preferred is not None and unavailable_reason(preferred, device) is None
                  and unsupported_reason(preferred, op, num_streams) is None
                  and not _auto_avoids(preferred, op, coefficients))
        return preferred if usable else "torch"
    reason = unavailable_reason(name, device) or unsupported_reason(name, op, num_streams)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} was requested but cannot run: {reason}. Use backend 'auto' or 'torch'.")
    return name


def _shape_key(tensors):
    return tuple((tuple(t.shape[-2:]), t.dtype, t.device.type) for t in tensors)


def recording_for_export() -> bool:
    """Whether ``torch.jit.trace`` or an ONNX exporter (the TorchScript one traces; torch's default one runs
    torch.export, under which the compiler flag is set) records the ops: a fraction of a microsecond in eager mode,
    where ``torch.onnx.is_in_onnx_export`` alone costs more (two imports a call)."""
    return torch.jit.is_tracing() or (torch.compiler.is_compiling() and torch.onnx.is_in_onnx_export())


def _run(op: str, backend, num_streams: int, *args):
    if recording_for_export():  # see the module's docstring
        return _DEFINITIONS[op](*args)
    device = args[0].device
    coefficients = args[2].shape[1] if op == "stream_pre" else 0  # what auto's rules read: 2n + m
    name = backend_for(backend, device, op, num_streams, coefficients)
    run = getattr(backend_module(name), op)
    if name != "triton" or resolve_backend(backend) != "auto" or torch.compiler.is_compiling():
        return run(*args)
    key = (op, _shape_key([a for a in args if isinstance(a, torch.Tensor)]))
    if key not in _failed_kernels:
        try:
            if key not in _verified_backwards and _records_grad(args) and not _capturing(args):
                _probe_backward(run, args)  # once per op and shape
                _verified_backwards.add(key)
            return run(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # a kernel that does not compile or launch on this GPU
            _failed_kernels[key] = f"{type(e).__name__}: {e}"
            warnings.warn(f"the Triton kernel for {op} failed for inputs {key[1]} ({_failed_kernels[key]}); "
                          "backend 'auto' runs the PyTorch path for this op and shape from now on "
                          "(backend 'triton' would raise)", RuntimeWarning, stacklevel=3)
    return getattr(backend_module("torch"), op)(*args)


def _capturing(args) -> bool:
    """Whether a CUDA graph is being captured on the current stream (a probe would be recorded into it)."""
    return args[0].is_cuda and torch.cuda.is_current_stream_capturing()


def _records_grad(args) -> bool:
    if not torch.is_grad_enabled():
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return True
    return False


def _same(t):
    return t


def _probe_backward(run, args) -> None:
    """Run the op's backward kernels once, now: ``run`` on detached copies of ``args`` (same storage) and
    ``torch.autograd.grad`` of its outputs with zero gradients, under saved-tensor hooks of its own (not
    ``hc_recompute``'s or a checkpoint's), everything dropped after. A backward kernel that does not compile or
    launch raises here, in the forward, where ``auto`` can still take the PyTorch path for the op in both
    directions; the real backward pass keeps nothing more than it would."""
    leaves = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    wanted = [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
        out = run(*leaves)
        outs = [o for o in ((out,) if isinstance(out, torch.Tensor) else out)
                if isinstance(o, torch.Tensor) and o.grad_fn is not None]
        if outs:
            torch.autograd.grad(outs, wanted, [torch.zeros_like(o) for o in outs], allow_unused=True)


def stream_pre(X, norm_weight, proj_weight, scale, bias, eps: float, backend=None, checked: bool = True):
    """``u (..., C), h_pre (..., n), h_post (..., n), a_res (..., m)`` and the stream state to hand to
    :func:`stream_post`, on the backend in force (see :func:`kromhc_vision.ops.reference.stream_pre`);
    ``checked`` as in :func:`stream_post` (each backend checks the shapes again, as it is also called alone)."""
    if checked:
        reference.check_stream_pre_args(X, norm_weight, proj_weight, scale, bias)
    return _run("stream_pre", backend, X.shape[-2], X, norm_weight, proj_weight, scale, bias, eps)


def stream_post(X, y, h_res, h_post, backend=None, checked: bool = True):
    """``X_next = H_res X + H_post^T y`` on the backend in force (see :func:`.reference.stream_post`).
    ``checked=False`` skips the argument checks (the connections, whose arguments are theirs by construction: a few
    microseconds a call, which small widths feel)."""
    if checked:
        reference.check_stream_post_shapes(X, y, h_res, h_post)
    return _run("stream_post", backend, X.shape[-2], X, y, h_res, h_post)


def sinkhorn(logits, num_iters: int, backend=None, checked: bool = True):
    """mHC's ``H_res`` from ``(..., n, n)`` logits on the backend in force (see :func:`.reference.sinkhorn`);
    ``checked`` as in :func:`stream_post`."""
    if checked:
        reference.check_sinkhorn_args(logits, num_iters)
    return _run("sinkhorn", backend, logits.shape[-1], logits, num_iters)


def permutation_mix(logits, perms, backend=None, checked: bool = True):
    """mHC-lite's / KromHC's ``H_res (..., n, n)`` from ``(..., sum_k i_k!)`` logits and ``perms[k] =
    permutation_matrices(i_k)`` on the backend in force (see :func:`kromhc_vision.residual_maps.kronecker_birkhoff`);
    ``checked`` as in :func:`stream_post`."""
    if checked:
        reference.check_permutation_mix_args(logits, perms)
    n = 1
    for p in perms:  # a loop, which torch.compile(fullgraph=True) traces, where math.prod over a generator breaks
        n *= p.shape[-1]
    return _run("permutation_mix", backend, n, logits, perms)


def prepare_permutation_mix(factors, device: torch.device, backend=None) -> None:
    """Make now what the backend's ``permutation_mix`` would make on its first call for ``factors`` on ``device``:
    the Triton kernels' tables, copied from the host. The mHC-lite and KromHC connections call this when built and
    whenever moved (``Module._apply``), so that the first forward pass makes nothing: not inside a CUDA graph
    capture (which cannot record the copy), nor in ``torch.compile``'s CUDA graph warm-up (whose allocations come
    from the graphs' private pool). Does nothing where that backend would not run, and raises nothing (a backend
    that cannot run says so at the first call)."""
    name = resolve_backend(backend)
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        if unavailable_reason("triton", device) is None:
            backend_module("triton").prepare_permutation_mix(factors, device)
